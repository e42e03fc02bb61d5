//! The whole `main` of a service, so that each binary only names its `run`.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::args::LogArgs;

/// A service's configuration: its flags (each with an environment variable) and where its
/// logging settings are.
pub trait ServiceConfig: clap::Parser {
    fn log(&self) -> &LogArgs;
}

/// Parses the flags and environment (exits with usage on an error), starts logging, and
/// drives `run(config, shutdown)` on a multi-threaded runtime, `shutdown` being cancelled on
/// SIGINT or SIGTERM. Tests call `run` in-process with a token of their own instead.
pub fn main<C, F, Fut>(run: F) -> anyhow::Result<()>
where
    C: ServiceConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = C::parse();
    crate::telemetry::init_logging(config.log());
    tokio::runtime::Runtime::new()?.block_on(async move { run(config, crate::shutdown::on_signals()).await })
}
