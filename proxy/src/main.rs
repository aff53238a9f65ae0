use clap::Parser;

fn main() -> anyhow::Result<()> {
    tandem_proxy::run_blocking(tandem_proxy::Args::parse())?;
    Ok(())
}
