use clap::Parser;
use meterflow_aggregator::{run, Config};

/// Every accepted event allocates its raw row's strings, and the writer task frees them on
/// another thread: glibc's malloc spent ~25% of the aggregator's CPU on that (perf, see
/// docs/benchmarks.md); mimalloc's thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    meterflow_runtime::telemetry::init_logging(&config.log);
    let shutdown = meterflow_runtime::shutdown::on_signals();
    run(config, shutdown).await
}
