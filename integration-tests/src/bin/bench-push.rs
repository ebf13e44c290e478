//! `bench-push`: how long an admin write takes to reach every subscriber.
//! Opens N routing-table streams as edges (real gRPC over mutual TLS, one
//! process), then makes admin writes that change every edge's table (a new
//! pool in the region) one at a time and measures, for each subscriber, the
//! time from the write's start until it holds a table that includes it (it
//! ACKs at once, as edges do, and applies table changes as edges do).
//! Then the bytes pushed per change as the table grows (pools added in
//! bulk), to subscribers that apply changes and to subscribers that take
//! whole tables.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ulimit -n 20000
//! INFERMESH_BIN_DIR=target/release target/release/bench-push --subscribers 100,1000 --writes 20 --table-pools 10,100,1000
//! ```
//! Prints Markdown tables.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermesh_integration_tests::bench::{arg, percentile};
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use infermesh_proto::v1::admin_service_client::AdminServiceClient;
use infermesh_proto::v1::discovery_service_client::DiscoveryServiceClient;
use infermesh_proto::v1::{
    Ack, CreateModelRequest, CreatePoolRequest, EngineKind, Hello, Model, Pool, RoutingTable,
    SubscribeRequest, SubscriberRole, subscribe_request,
};
use infermesh_runtime::control_plane::ControlPlaneClient;
use infermesh_runtime::table_delta;
use infermesh_runtime::tls::{PeerRole, client_config};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// What one subscriber received.
struct Received {
    version: u64,
    at: Instant,
    /// Encoded size of the message.
    bytes: usize,
}

/// What each subscriber received, in order.
type Seen = Arc<Vec<Mutex<Vec<Received>>>>;

async fn subscribe(
    client: ControlPlaneClient,
    address: String,
    index: usize,
    deltas: bool,
    seen: Seen,
) {
    let Ok(channel) = client.connect(&address, Duration::from_secs(30)).await else {
        return;
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = Hello {
        role: SubscriberRole::Edge as i32,
        region: "eu-west".into(),
        node_id: format!("bench-{index}-{deltas}"),
        version_held: 0,
        accepts_deltas: deltas,
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
    let mut last: Option<RoutingTable> = None;
    while let Ok(Some(message)) = inbound.message().await {
        let bytes = message.encoded_len();
        let table = match (message.table, message.delta) {
            (Some(table), _) => table,
            (None, Some(delta)) => {
                let Some(base) = &last else { return };
                table_delta::apply(base, delta).expect("a change that applies")
            }
            (None, None) => continue,
        };
        let version = table.version;
        last = Some(table);
        seen[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Received {
                version,
                at: Instant::now(),
                bytes,
            });
        let ack = SubscribeRequest {
            kind: Some(subscribe_request::Kind::Ack(Ack { version })),
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
    let table_pools: Vec<usize> = arg("--table-pools", "10,100,1000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
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
                true,
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
            admin
                .create_model(CreateModelRequest {
                    model: Some(Model {
                        name: name.clone(),
                        ..Default::default()
                    }),
                })
                .await
                .expect("create model");
            let started = Instant::now();
            let revision = add_pool(&mut admin, &format!("{name}-eu"), &name).await;
            let reached = |seen: Seen| async move {
                let mut arrivals = Vec::with_capacity(seen.len());
                for s in seen.iter() {
                    let got = s.lock().unwrap_or_else(|e| e.into_inner());
                    arrivals.push(got.iter().find(|r| r.version >= revision)?.at);
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
    bytes_per_change(&mesh, &mut admin, subscriber_client, &table_pools, writes).await;
}

/// Adds pool `name` of `model` to eu-west; the revision of the write.
async fn add_pool(admin: &mut AdminServiceClient<Channel>, name: &str, model: &str) -> u64 {
    let pool = Pool {
        name: name.to_string(),
        model: model.to_string(),
        region: "eu-west".into(),
        engine: EngineKind::Vllm as i32,
        min_replicas: 1,
        max_replicas: 1,
        ..Default::default()
    };
    let created = admin
        .create_pool(CreatePoolRequest { pool: Some(pool) })
        .await
        .expect("create pool")
        .into_inner();
    u64::try_from(created.revision).unwrap_or(0)
}

/// Bytes each subscriber receives per change while the table grows: 20
/// subscribers apply changes, 20 take whole tables; at each size, `writes`
/// new pools one at a time.
async fn bytes_per_change(
    mesh: &Mesh,
    admin: &mut AdminServiceClient<Channel>,
    client: ControlPlaneClient,
    table_pools: &[usize],
    writes: usize,
) {
    const EACH: usize = 20;
    let seen: Seen = Arc::new((0..2 * EACH).map(|_| Mutex::new(Vec::new())).collect());
    let tasks: Vec<_> = (0..2 * EACH)
        .map(|i| {
            tokio::spawn(subscribe(
                client.clone(),
                mesh.control_plane_address.clone(),
                i,
                i < EACH,
                seen.clone(),
            ))
        })
        .collect();
    let all_at = |seen: Seen, revision: u64| async move {
        seen.iter()
            .all(|s| {
                let got = s.lock().unwrap_or_else(|e| e.into_inner());
                got.last().is_some_and(|r| r.version >= revision)
            })
            .then_some(())
    };
    println!();
    println!(
        "| pools in the table | table bytes (whole table pushed) | bytes per change (changes pushed) | whole / change |"
    );
    println!("|---|---|---|---|");
    let mut pools = 0;
    for &size in table_pools {
        let mut revision = 0;
        while pools < size {
            revision = add_pool(admin, &format!("bulk-{pools}"), "llama").await;
            pools += 1;
        }
        wait::until(
            "the grown table at every subscriber",
            Duration::from_secs(120),
            || all_at(seen.clone(), revision),
        )
        .await;
        let marks: Vec<usize> = seen
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .collect();
        for _ in 0..writes {
            revision = add_pool(admin, &format!("bulk-{pools}"), "llama").await;
            pools += 1;
            wait::until(
                "the change at every subscriber",
                Duration::from_secs(60),
                || all_at(seen.clone(), revision),
            )
            .await;
        }
        let mean = |group: std::ops::Range<usize>| {
            let sizes: Vec<usize> = group
                .flat_map(|i| {
                    let got = seen[i].lock().unwrap_or_else(|e| e.into_inner());
                    got[marks[i]..].iter().map(|r| r.bytes).collect::<Vec<_>>()
                })
                .collect();
            sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64
        };
        let (delta, whole) = (mean(0..EACH), mean(EACH..2 * EACH));
        println!(
            "| {size} | {whole:.0} | {delta:.0} | {:.0}x |",
            whole / delta.max(1.0)
        );
    }
    for task in tasks {
        task.abort();
    }
}
