use clap::Parser;
use infermesh_edge::{config::Config, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    infermesh_runtime::telemetry::init("info");
    let config = Config::parse();
    let cancel = infermesh_runtime::shutdown::on_signal();
    server::run(config, cancel).await
}
