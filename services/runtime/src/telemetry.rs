//! Logging set-up.

use crate::args::LogArgs;

/// Installs the global subscriber once; later calls (tests running several services in one
/// process) are ignored.
pub fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if args.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
