/// Every accepted event allocates its raw row's strings, and the writer task frees them on
/// another thread: glibc's malloc spent ~25% of the aggregator's CPU on that (perf, see
/// docs/benchmarks.md); mimalloc's thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    meterflow_runtime::service::main(meterflow_aggregator::run)
}
