//! The edge binary: parses its flags and serves until a shutdown signal.

use clap::Parser;
use infermesh_edge::{config::Config, server};

// Every request allocates buffers and headers on several threads; mimalloc's
// per-thread heaps cost less per allocation than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = infermesh_runtime::telemetry::init("info", "infermesh-edge");
    let config = Config::parse();
    let cancel = infermesh_runtime::shutdown::on_signal();
    let result = server::run(config, cancel).await;
    telemetry.shutdown().await;
    result
}
