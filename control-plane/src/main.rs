use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = tandem_control_plane::Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tandem-cp")
        .build()?;
    runtime.block_on(tandem_control_plane::run(args))?;
    Ok(())
}
