//! `bench-push`: how long an admin write takes to reach every subscriber.
//! Opens N routing-table streams as edges (real gRPC over mutual TLS, one
//! process), then makes admin writes that change every edge's table (a new
//! pool in the region) one at a time and measures, for each subscriber, the
//! time from the write's start until it holds a table that includes it (it
//! ACKs at once, as edges do).
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ulimit -n 20000
//! INFERMESH_BIN_DIR=target/release target/release/bench-push --subscribers 100,1000 --writes 20
//! ```
//! Prints a Markdown table.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermesh_integration_tests::bench::{arg, percentile};
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use infermesh_proto::v1::admin_service_client::AdminServiceClient;
use infermesh_proto::v1::discovery_service_client::DiscoveryServiceClient;
use infermesh_proto::v1::{
    Ack, CreateModelRequest, CreatePoolRequest, EngineKind, Hello, Model, Pool, SubscribeRequest,
    SubscriberRole, subscribe_request,
};
use infermesh_runtime::control_plane::ControlPlaneClient;
use infermesh_runtime::tls::{PeerRole, client_config};
use tokio_stream::wrappers::ReceiverStream;

/// (version, when it arrived) per subscriber.
type Seen = Arc<Vec<Mutex<Vec<(u64, Instant)>>>>;

async fn subscribe(client: ControlPlaneClient, address: String, index: usize, seen: Seen) {
    let Ok(channel) = client.connect(&address, Duration::from_secs(30)).await else {
        return;
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = Hello {
        role: SubscriberRole::Edge as i32,
        region: "eu-west".into(),
        node_id: format!("bench-{index}"),
        version_held: 0,
    };
    let _ = tx
        .send(SubscribeRequest {
            kind: Some(subscribe_request::Kind::Hello(hello)),
        })
        .await;
    let Ok(response) = DiscoveryServiceClient::new(channel)
        .subscribe(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = response.into_inner();
    while let Ok(Some(message)) = inbound.message().await {
        let Some(table) = message.table else { continue };
        seen[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((table.version, Instant::now()));
        let ack = SubscribeRequest {
            kind: Some(subscribe_request::Kind::Ack(Ack {
                version: table.version,
            })),
        };
        if tx.send(ack).await.is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = arg("--subscribers", "100,1000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let writes: usize = arg("--writes", "20").parse().unwrap_or(20);
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let edge_cert = mesh.pki.client(PeerRole::Edge, "eu-west");
    let admin_cert = mesh.pki.client(PeerRole::Admin, "bench");
    let tls = |pair: &infermesh_integration_tests::pki::CertPair| {
        client_config(&mesh.pki.ca_cert, Some((&pair.cert, &pair.key))).expect("client TLS")
    };
    let subscriber_client = ControlPlaneClient::tls(tls(&edge_cert));
    let admin_channel = ControlPlaneClient::tls(tls(&admin_cert))
        .connect(&mesh.control_plane_address, Duration::from_secs(10))
        .await
        .expect("admin channel");
    let mut admin = AdminServiceClient::new(admin_channel);

    println!("| subscribers | writes | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (round, &n) in sizes.iter().enumerate() {
        let seen: Seen = Arc::new((0..n).map(|_| Mutex::new(Vec::new())).collect());
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tasks.push(tokio::spawn(subscribe(
                subscriber_client.clone(),
                mesh.control_plane_address.clone(),
                i,
                seen.clone(),
            )));
        }
        let first_tables = |seen: Seen| async move {
            seen.iter()
                .all(|s| !s.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
                .then_some(())
        };
        wait::until(
            "every subscriber's first table",
            Duration::from_secs(120),
            || first_tables(seen.clone()),
        )
        .await;
        let mut latencies = Vec::with_capacity(n * writes);
        for w in 0..writes {
            // A model alone is not in an edge's table; its pool puts it there.
            let name = format!("push-{round}-{w}");
            let model = Model {
                name: name.clone(),
                ..Default::default()
            };
            admin
                .create_model(CreateModelRequest { model: Some(model) })
                .await
                .expect("create model");
            let pool = Pool {
                name: format!("{name}-eu"),
                model: name,
                region: "eu-west".into(),
                engine: EngineKind::Vllm as i32,
                min_replicas: 1,
                max_replicas: 1,
                ..Default::default()
            };
            let started = Instant::now();
            let created = admin
                .create_pool(CreatePoolRequest { pool: Some(pool) })
                .await
                .expect("create pool")
                .into_inner();
            let revision = u64::try_from(created.revision).unwrap_or(0);
            let reached = |seen: Seen| async move {
                let mut arrivals = Vec::with_capacity(seen.len());
                for s in seen.iter() {
                    let got = s.lock().unwrap_or_else(|e| e.into_inner());
                    arrivals.push(
                        got.iter()
                            .find(|(v, _)| *v >= revision)
                            .map(|(_, at)| *at)?,
                    );
                }
                Some(arrivals)
            };
            let arrivals = wait::until(
                "the write to reach every subscriber",
                Duration::from_secs(60),
                || reached(seen.clone()),
            )
            .await;
            latencies.extend(arrivals.into_iter().map(|at| at.duration_since(started)));
        }
        latencies.sort();
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        println!(
            "| {n} | {writes} | {} | {} | {} |",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(*latencies.last().unwrap())
        );
        for task in tasks {
            task.abort();
        }
    }
}
