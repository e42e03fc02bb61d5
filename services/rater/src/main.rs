/// Outputs are built on the loop and freed by the writer task on another thread, the pattern
/// glibc's malloc handles worst (measured on the aggregator, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    meterflow_runtime::service::main(meterflow_rater::run)
}
