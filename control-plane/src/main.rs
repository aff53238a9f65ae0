use clap::Parser;

fn main() {
    let args = tandem_control_plane::Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tandem-cp")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|runtime| {
            runtime
                .block_on(tandem_control_plane::run(args))
                .map_err(|e| e.to_string())
        });
    if let Err(error) = result {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
