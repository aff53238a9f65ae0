//! `tandem simulate --config FILE --from REGION/ZONE`: what a proxy in that locality
//! would do with each service of a services file, computed by the proxy's own
//! balancer (the `tandem-balancer` crate). An operator sees what losing half of a
//! zone's pods does before it happens.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use tandem_balancer::{Balancer, BalancerConfig, EndpointView, Health, Locality, Mode, Origin};
use tandem_control_plane::model::Health as FileHealth;
use tandem_control_plane::source::file::parse;

use crate::endpoints::Output;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// A services file, in the control plane's file-source format.
    #[arg(long)]
    pub config: PathBuf,
    /// The proxy's locality, REGION/ZONE.
    #[arg(long, value_parser = Locality::parse)]
    pub from: Locality,
    /// table, or json: per service, `zones` and `endpoints` shares in [0, 1] and `cross_zone`.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
    /// As the proxy's flag of the same name.
    #[arg(long, default_value_t = 1.4)]
    pub overprovisioning_factor: f64,
    /// As the proxy's flag of the same name (percent).
    #[arg(long, default_value_t = 50.0)]
    pub panic_threshold: f64,
    /// As the proxy's flag of the same name.
    #[arg(long, default_value_t = 6)]
    pub zone_aware_min_endpoints: usize,
    /// Callers' shares to assume where the file says `callers: counted` (the control
    /// plane counts them at run time), e.g. `zone-a=2,zone-b=1`.
    #[arg(long, value_parser = parse_callers)]
    pub callers: Option<BTreeMap<String, f64>>,
}

fn parse_callers(s: &str) -> Result<BTreeMap<String, f64>, String> {
    s.split(',')
        .map(|pair| {
            let (zone, share) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not ZONE=SHARE"))?;
            let share: f64 = share
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("share {share:?} of {zone:?} is not a number >= 0"))?;
            Ok((zone.to_string(), share))
        })
        .collect()
}

/// What one service's traffic does from `from`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Simulation {
    pub mode: Mode,
    pub zones: BTreeMap<String, f64>,
    pub endpoints: BTreeMap<String, f64>,
    pub cross_zone: f64,
}

fn health(h: FileHealth) -> Health {
    match h {
        FileHealth::Healthy => Health::Healthy,
        FileHealth::Draining => Health::Draining,
        FileHealth::Unhealthy => Health::Unhealthy,
    }
}

pub fn simulate(args: &SimulateArgs) -> anyhow::Result<BTreeMap<String, Simulation>> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let content = parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let config = BalancerConfig {
        overprovisioning: args.overprovisioning_factor,
        panic_threshold: args.panic_threshold / 100.0,
        min_zone_aware_endpoints: args.zone_aware_min_endpoints,
        slow_start: None,
    };
    let mut out = BTreeMap::new();
    for (key, spec) in &content.services {
        let endpoints: Vec<_> = spec.endpoints.values().collect();
        let views: Vec<EndpointView<'_>> = endpoints
            .iter()
            .map(|e| EndpointView {
                weight: e.weight,
                health: health(e.health),
                ejected: false,
                region: &e.locality.region,
                zone: &e.locality.zone,
                healthy_for: None,
            })
            .collect();
        let origin = Origin {
            region: &args.from.region,
            zone: &args.from.zone,
            callers: match &args.callers {
                Some(assumed) if spec.policy.count_callers => Some(assumed),
                _ => Some(&spec.callers).filter(|c| !c.is_empty()),
            },
        };
        let balancer = Balancer::build(&views, &origin, &config, 0);
        let shares = balancer.expected_shares();
        let mut zones: BTreeMap<String, f64> = BTreeMap::new();
        let mut by_endpoint = BTreeMap::new();
        let mut local = 0.0;
        for (e, share) in endpoints.iter().zip(&shares) {
            *zones.entry(e.locality.zone.clone()).or_default() += share;
            by_endpoint.insert(e.address.to_string(), *share);
            if e.locality.zone == args.from.zone && e.locality.region == args.from.region {
                local += share;
            }
        }
        let total: f64 = shares.iter().sum();
        out.insert(
            key.to_string(),
            Simulation {
                mode: balancer.mode(),
                zones,
                endpoints: by_endpoint,
                // Nothing routable: nothing crosses zones either.
                cross_zone: if total > 0.0 {
                    (total - local).max(0.0)
                } else {
                    0.0
                },
            },
        );
    }
    Ok(out)
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let result = simulate(&args)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json!(result))?),
        Output::Table => {
            for (service, s) in &result {
                println!(
                    "{service} from {}/{} ({})",
                    args.from.region,
                    args.from.zone,
                    serde_json::to_value(s.mode)?.as_str().unwrap_or_default()
                );
                for (zone, share) in &s.zones {
                    let zone = if zone.is_empty() { "(no zone)" } else { zone };
                    println!("  zone {zone:<20} {:>6.1}%", share * 100.0);
                }
                println!("  crosses zones            {:>6.1}%", s.cross_zone * 100.0);
                for (address, share) in &s.endpoints {
                    println!("    {address:<24} {:>6.1}%", share * 100.0);
                }
                println!();
            }
        }
    }
    Ok(())
}
