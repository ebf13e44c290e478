//! The sidecar binary: parses its flags and runs until a shutdown signal, or
//! runs once as the pod's preStop hook.

use clap::Parser;
use infermesh_sidecar::{config::Config, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = infermesh_runtime::telemetry::init("info", "infermesh-sidecar");
    // `infermesh-sidecar --prestop-hook SOCKET` is the pod's preStop hook,
    // not a sidecar: it takes none of the sidecar's flags.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, flag, socket] = args.as_slice()
        && flag == "--prestop-hook"
    {
        return match infermesh_sidecar::prestop::run_hook(std::path::Path::new(socket)).await {
            Ok(answer) => {
                println!("{answer}");
                Ok(())
            }
            Err(error) => Err(anyhow::Error::msg(error)),
        };
    }
    let config = Config::parse();
    let stop = infermesh_runtime::shutdown::on_signal();
    let result = server::run(config, stop).await;
    telemetry.shutdown().await;
    result
}
