//! `bench-memory`: resident memory of the sidecar idle and under load, and
//! of the edge holding many idle client connections, read from /proc.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ulimit -n 20000
//! INFERMESH_BIN_DIR=target/release target/release/bench-memory [--connections 10000]
//! ```
//! Prints a Markdown table.

use std::time::{Duration, Instant};

use infermesh_integration_tests::bench::arg_u64;
use infermesh_integration_tests::load::SteadyLoad;
use infermesh_integration_tests::mesh::Mesh;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

#[tokio::main]
async fn main() {
    let connections = arg_u64("--connections", 10_000) as usize;
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let replica = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--max-num-seqs", "64"],
        )
        .await;
    let edge = mesh
        .start_edge(
            "eu-west",
            &[
                "--access-log",
                "false",
                "--header-read-timeout-ms",
                "600000",
            ],
        )
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "stream": true, "max_tokens": 16,
        "messages": [{"role": "user", "content": "measure me"}]});
    mesh.wait_until_served(&url, &body).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sidecar_idle = replica.sidecar.rss_bytes().expect("sidecar RSS");
    let edge_idle = edge.process.rss_bytes().expect("edge RSS");

    // Sidecar under load: 32 streaming clients for 10 s, peak RSS sampled.
    let load = SteadyLoad::start(&mesh.http, &url, &body, 32);
    let until = Instant::now() + Duration::from_secs(10);
    let mut sidecar_peak = 0;
    while Instant::now() < until {
        sidecar_peak = sidecar_peak.max(replica.sidecar.rss_bytes().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (served, failed) = load.stop().await;

    // Edge with many idle keep-alive connections, each after one request.
    let edge_loaded = edge.process.rss_bytes().expect("edge RSS");
    let address = edge.url.trim_start_matches("http://").to_string();
    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections {
        let Ok(mut stream) = tokio::net::TcpStream::connect(&address).await else {
            break;
        };
        if stream
            .write_all(b"GET /livez HTTP/1.1\r\nhost: edge\r\n\r\n")
            .await
            .is_err()
        {
            break;
        }
        let mut buf = [0u8; 512];
        if stream.read(&mut buf).await.unwrap_or(0) == 0 {
            break;
        }
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let edge_connections = edge.process.rss_bytes().expect("edge RSS");

    println!("| process | state | RSS MiB | target |");
    println!("|---|---|---|---|");
    println!("| sidecar | idle | {} | < 20 |", mib(sidecar_idle));
    println!(
        "| sidecar | 32 streaming clients for 10 s ({served} streams, {failed} failed), peak | {} | < 20 |",
        mib(sidecar_peak)
    );
    println!("| edge | idle | {} | |", mib(edge_idle));
    println!(
        "| edge | after the streaming load, before the connections | {} | |",
        mib(edge_loaded)
    );
    println!(
        "| edge | {} idle client connections held ({:.1} KiB each over the line above) | {} | < 64 |",
        held.len(),
        edge_connections.saturating_sub(edge_loaded) as f64 / 1024.0 / held.len().max(1) as f64,
        mib(edge_connections)
    );
}
