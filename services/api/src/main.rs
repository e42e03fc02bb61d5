fn main() -> anyhow::Result<()> {
    meterflow_runtime::service::main(meterflow_api::run)
}
