//! The simulated engine binary: serves on its listen address, prints the
//! address it got (for tests that ask for port 0) and runs until Ctrl-C.

use std::io::Write;

use clap::Parser;
use infermesh_sim_engine::{config::Config, engine::Engine, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let config = Config::parse();
    config.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let engine = Engine::new(config);
    server::serve(engine, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
