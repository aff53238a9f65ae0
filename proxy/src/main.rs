use clap::Parser;

fn main() {
    if let Err(error) = tandem_proxy::run_blocking(tandem_proxy::Args::parse()) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
