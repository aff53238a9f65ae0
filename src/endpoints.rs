//! `tandem endpoints NAME[:PORT]`: subscribes to the control plane like a proxy and
//! prints the backend set, for operators asking "where does my traffic go?".

use anyhow::{Context, bail};
use serde_json::json;
use tandem_proto::discovery::v1 as pb;
use tandem_proxy::balancer::Health;
use tandem_proxy::discovery::{ServiceView, ViewBuilder, control_plane_endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EndpointsArgs {
    /// The destination as a client names it: web, web.shop, web.shop.svc.cluster.local:8080, 10.96.0.10:80.
    pub name: String,
    /// The control plane's discovery address.
    #[arg(long, env = "TANDEM_CONTROL_PLANE", default_value = "127.0.0.1:8086")]
    pub control_plane: String,
    /// The namespace short names resolve in.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// table, or json: one array of {address, weight, region, zone, health, ...} per update.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
    /// Keep printing the set after every update (until Ctrl-C).
    #[arg(long)]
    pub watch: bool,
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Draining => "draining",
        Health::Unhealthy => "unhealthy",
    }
}

/// The JSON form: one array of endpoints.
pub fn to_json(view: &ServiceView) -> serde_json::Value {
    view.endpoints
        .values()
        .map(|e| {
            json!({
                "address": e.address.to_string(),
                "weight": e.weight,
                "region": e.locality.region,
                "zone": e.locality.zone,
                "subzone": e.locality.subzone,
                "health": health(e.health),
                "name": e.name,
                "identity": e.identity,
                "protocol": e.protocol,
            })
        })
        .collect()
}

fn print_table(view: &ServiceView) {
    println!(
        "{} (version {}, {} endpoints{})",
        view.service,
        view.version,
        view.endpoints.len(),
        if view.traffic_distribution.is_empty() {
            String::new()
        } else {
            format!(", trafficDistribution {}", view.traffic_distribution)
        }
    );
    println!(
        "{:<24} {:<10} {:>6}  {:<14} {:<14} NAME",
        "ADDRESS", "HEALTH", "WEIGHT", "REGION", "ZONE"
    );
    for e in view.endpoints.values() {
        println!(
            "{:<24} {:<10} {:>6}  {:<14} {:<14} {}",
            e.address.to_string(),
            health(e.health),
            e.weight,
            e.locality.region,
            e.locality.zone,
            e.name
        );
    }
}

pub async fn run(args: EndpointsArgs) -> anyhow::Result<()> {
    let endpoint = control_plane_endpoint(&args.control_plane).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {}", args.control_plane))?;
    let mut client = pb::discovery_client::DiscoveryClient::new(channel)
        .max_decoding_message_size(tandem_proxy::discovery::MAX_MESSAGE_BYTES);
    let request = pb::WatchRequest {
        destination: args.name.clone(),
        proxy: Some(pb::ProxyIdentity {
            namespace: args.namespace.clone(),
            ..Default::default()
        }),
    };
    let mut stream = match client.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => bail!("{}: {}", args.name, status.message()),
    };
    let mut builder = ViewBuilder::default();
    loop {
        let update = match stream.message().await {
            Ok(Some(update)) => update,
            Ok(None) => bail!("the control plane closed the stream"),
            Err(status) => bail!("{}: {}", args.name, status.message()),
        };
        let Some(view) = builder.apply(&update).map_err(anyhow::Error::msg)? else {
            continue;
        };
        match args.output {
            Output::Json => println!("{}", to_json(view)),
            Output::Table => {
                print_table(view);
                if args.watch {
                    println!();
                }
            }
        }
        if !args.watch {
            return Ok(());
        }
    }
}
