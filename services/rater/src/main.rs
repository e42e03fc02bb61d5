use clap::Parser;
use meterflow_rater::{run, Config};

/// Outputs are built on the loop and freed by the writer task on another thread, the pattern
/// glibc's malloc handles worst (measured on the aggregator, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    meterflow_runtime::telemetry::init_logging(&config.log);
    let shutdown = meterflow_runtime::shutdown::on_signals();
    run(config, shutdown).await
}
