//! `meterflow-producer`: parses the command line and hands over to [`meterflow_producer::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = meterflow_producer::Cli::parse();
    let shutdown = meterflow_runtime::shutdown::on_signals();
    meterflow_producer::run(cli, shutdown).await
}
