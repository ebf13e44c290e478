use clap::Parser;
use infermesh_sidecar::{config::Config, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = infermesh_runtime::telemetry::init("info", "infermesh-sidecar");
    let config = Config::parse();
    let stop = infermesh_runtime::shutdown::on_signal();
    let result = server::run(config, stop).await;
    telemetry.shutdown().await;
    result
}
