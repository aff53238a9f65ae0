use clap::Parser;

// jemalloc, as linkerd2-proxy uses: measured with bench/compare.sh's loads, about 10%
// less CPU per HTTP/2 request than glibc's malloc (hyper and h2 allocate per stream),
// the same on HTTP/1.1, and peak RSS still well under 20 MiB. (mimalloc was as fast
// but its huge-page arenas took peak RSS to 27 MiB.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    if let Err(error) = tandem_proxy::run_blocking(tandem_proxy::Args::parse()) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
