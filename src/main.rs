use clap::{Parser, Subcommand};

/// Tandem: a service mesh data plane. Start with `tandem demo`.
#[derive(Debug, Parser)]
#[command(name = "tandem", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// See round-robin balancing work: backends, a control plane and a proxy on this machine.
    Demo(tandem::demo::DemoArgs),
    /// Print a destination's endpoints as the control plane serves them to proxies.
    Endpoints(tandem::endpoints::EndpointsArgs),
    /// What a proxy in one locality would do with each service of a services file.
    Simulate(tandem::simulate::SimulateArgs),
    /// A tiny HTTP/1.1, HTTP/2 and gRPC server that answers with its name.
    Backend(tandem::backend::BackendArgs),
    /// Run the proxy (the same as the tandem-proxy binary).
    Proxy(Box<tandem_proxy::Cli>),
    /// Run the control plane (the same as the tandem-control-plane binary).
    ControlPlane(Box<tandem_control_plane::Args>),
    /// Add the proxy to workloads in YAML files (or stdin), as the webhook would.
    Inject(Box<tandem::inject::InjectCommand>),
    /// Stand in for the kubelets and the scheduler of a test cluster (see tests/cluster).
    NodeAgent(Box<tandem::node_agent::NodeAgentArgs>),
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        // One line a user can act on; not a Debug dump with a backtrace.
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => {
            let exe = std::env::current_exe()?;
            current_thread()?.block_on(tandem::demo::run(args, &exe))
        }
        Command::Endpoints(args) => current_thread()?.block_on(tandem::endpoints::run(args)),
        Command::Simulate(args) => tandem::simulate::run(args),
        Command::Backend(args) => current_thread()?.block_on(tandem::backend::run(args)),
        Command::Proxy(cli) => Ok(tandem_proxy::main(*cli)?),
        Command::Inject(args) => tandem::inject::run(*args),
        Command::NodeAgent(args) => current_thread()?.block_on(tandem::node_agent::run(*args)),
        Command::ControlPlane(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            Ok(runtime.block_on(tandem_control_plane::run(*args))?)
        }
    }
}
