//! The control plane binary: parses its flags and runs the server until a
//! shutdown signal.

use clap::Parser;
use infermesh_control_plane::{config::Config, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = infermesh_runtime::telemetry::init("info", "infermesh-control-plane");
    let config = Config::parse();
    let cancel = infermesh_runtime::shutdown::on_signal();
    let result = server::run(config, cancel).await;
    telemetry.shutdown().await;
    result
}
