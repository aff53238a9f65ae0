use clap::Parser;

// jemalloc, as linkerd2-proxy uses: on bench/compare.sh's loads it cost less CPU per
// HTTP/2 request than glibc's malloc (measured when HTTP/2 was the h2 crate, which
// allocates per stream), the same on HTTP/1.1, within the proxy's memory targets.
// mimalloc was as fast but its huge-page arenas took more memory than the targets
// allow. Figures in bench/README.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    if let Err(error) = tandem_proxy::main(tandem_proxy::Cli::parse()) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
