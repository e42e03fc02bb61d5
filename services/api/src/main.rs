use clap::Parser;
use meterflow_api::{run, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    meterflow_runtime::telemetry::init_logging(&config.log);
    let shutdown = meterflow_runtime::shutdown::on_signals();
    run(config, shutdown).await
}
