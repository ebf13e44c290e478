//! `bench-fairness`: a noisy neighbour, with and without the edge's flow
//! control, on one simulated fleet.
//!
//! Two simulated vLLM replicas that run 4 requests each at once, behind one
//! edge. Tenant B sends streamed requests at a steady 20% of the fleet's
//! capacity; tenant A floods at twice the capacity (ten times its fair
//! half). Three runs: B alone; A and B without flow control (every request
//! goes straight to the engines' queues); A and B with flow control (the
//! model's `timeouts.queue_ms` at the 2 s SLO, the pool's `max_concurrency`
//! 4). For
//! each: B's time to first token (p50, p99), each tenant's goodput (answers
//! whose first token came within the 2 s SLO, per second), requests shed
//! with 503, and how many of B's requests the edge held in its queue.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! INFERMESH_BIN_DIR=target/release target/release/bench-fairness [--seconds 20]
//! ```
//! Prints a Markdown table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::BodyExt;
use infermesh_integration_tests::bench::{arg_u64, percentile};
use infermesh_integration_tests::mesh::Mesh;
use infermesh_runtime::http::{UpstreamClient, full, upstream_client};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const ENGINE_FLAGS: &[&str] = &[
    "--max-num-seqs",
    "4",
    "--prefill-us-per-token",
    "200",
    "--decode-ms-per-token",
    "10",
];
const SEQS: u64 = 4;
const REPLICAS: u64 = 2;
const MAX_TOKENS: u64 = 16;
const SLO: Duration = Duration::from_secs(2);
const QUEUE_MS: u64 = 2_000;

/// What one request came to.
enum Answer {
    /// Streamed; time to its first content chunk.
    Served(Duration),
    /// Refused with this status.
    Refused(u16),
    /// Failed in transport.
    Failed,
}

async fn send(client: &UpstreamClient, url: &str, key: &str, body: String) -> Answer {
    let started = Instant::now();
    let request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(full(body));
    let Ok(request) = request else {
        return Answer::Failed;
    };
    let Ok(response) = client.request(request).await else {
        return Answer::Failed;
    };
    if !response.status().is_success() {
        return Answer::Refused(response.status().as_u16());
    }
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Answer::Failed;
        };
        if first.is_none()
            && frame
                .data_ref()
                .is_some_and(|d| String::from_utf8_lossy(d).contains("\"content\""))
        {
            first = Some(started.elapsed());
        }
    }
    first.map_or(Answer::Failed, Answer::Served)
}

/// Poisson arrivals at `rate` per second for `seconds`; every answer.
async fn tenant(
    client: UpstreamClient,
    url: String,
    key: String,
    rate: f64,
    seconds: u64,
    seed: u64,
) -> Vec<Answer> {
    let mut rng = StdRng::seed_from_u64(seed);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut calls = Vec::new();
    let mut at = Instant::now();
    let mut i = 0u64;
    while at < end {
        tokio::time::sleep_until(at.into()).await;
        let body = json!({"model": "llama", "stream": true, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": format!("question {seed}-{i}")}]})
        .to_string();
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        calls.push(tokio::spawn(async move {
            send(&client, &url, &key, body).await
        }));
        i += 1;
        let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / rate;
        at += Duration::from_secs_f64(gap);
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap_or(Answer::Failed));
    }
    answers
}

/// One tenant's figures.
struct Figures {
    p50: Duration,
    p99: Duration,
    goodput: f64,
    shed: usize,
    failed: usize,
}

fn figures(answers: &[Answer], seconds: u64) -> Figures {
    let mut ttfts: Vec<Duration> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Served(t) => Some(*t),
            _ => None,
        })
        .collect();
    ttfts.sort();
    let good = ttfts.iter().filter(|t| **t <= SLO).count();
    Figures {
        p50: percentile(&ttfts, 0.5),
        p99: percentile(&ttfts, 0.99),
        goodput: good as f64 / seconds as f64,
        shed: answers
            .iter()
            .filter(|a| matches!(a, Answer::Refused(503)))
            .count(),
        failed: answers
            .iter()
            .filter(|a| matches!(a, Answer::Failed | Answer::Refused(_)))
            .count(),
    }
}

/// The edge's metrics page.
async fn metrics_text(client: &UpstreamClient, url: &str) -> String {
    let request = Request::builder()
        .uri(url)
        .body(full(String::new()))
        .expect("request");
    let response = client.request(request).await.expect("edge metrics");
    let body = response.into_body().collect().await.expect("metrics body");
    String::from_utf8_lossy(&body.to_bytes()).into_owned()
}

/// Sets the model's queue deadline (0: flow control off).
async fn queue_ms(mesh: &Mesh, ms: u64) {
    let model = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .expect("model");
    mesh.admin(
        "UpdateModel",
        json!({"model": {"name": "llama", "timeouts": {"queue_ms": ms}, "revision": model["revision"]},
            "update_mask": {"paths": ["timeouts.queue_ms"]}}),
    )
    .await
    .expect("update model");
}

#[tokio::main]
async fn main() {
    let seconds = arg_u64("--seconds", 20);
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let pool = mesh
        .admin("GetPool", json!({"name": "llama-eu"}))
        .await
        .expect("pool");
    mesh.admin(
        "UpdatePool",
        json!({"pool": {"name": "llama-eu", "max_concurrency": SEQS, "revision": pool["revision"]},
            "update_mask": {"paths": ["max_concurrency"]}}),
    )
    .await
    .expect("update pool");
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        replicas.push(
            mesh.start_replica(
                &format!("llama-{i}"),
                "llama-eu",
                "llama",
                "eu-west",
                ENGINE_FLAGS,
            )
            .await,
        );
    }
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let noisy = mesh.create_key("noisy", json!({})).await;
    let steady = mesh.create_key("steady", json!({})).await;
    let client = upstream_client(Duration::from_secs(2));
    for key in [&noisy, &steady] {
        infermesh_integration_tests::wait::until(
            "the key at the edge",
            Duration::from_secs(30),
            || async {
                let body = json!({"model": "llama", "stream": true, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}]})
                .to_string();
                matches!(send(&client, &url, key, body).await, Answer::Served(_)).then_some(())
            },
        )
        .await;
    }
    // Capacity: every slot busy for the time one request takes.
    let per_request = Duration::from_millis(10 * MAX_TOKENS) + Duration::from_millis(5);
    let capacity = (SEQS * REPLICAS) as f64 / per_request.as_secs_f64();
    let (b_rate, a_rate) = (0.2 * capacity, 2.0 * capacity);
    eprintln!(
        "capacity about {capacity:.0}/s: B {b_rate:.0}/s, A {a_rate:.0}/s, {seconds} s a run"
    );

    let mut rows = Vec::new();
    for (name, flow, with_a) in [
        ("B alone", false, false),
        ("A and B, no flow control", false, true),
        ("A and B, flow control", true, true),
    ] {
        queue_ms(&mesh, if flow { QUEUE_MS } else { 0 }).await;
        // The edge takes the change with the next push.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = tokio::spawn(tenant(
            client.clone(),
            url.clone(),
            steady.clone(),
            b_rate,
            seconds,
            1,
        ));
        let a = with_a.then(|| {
            tokio::spawn(tenant(
                client.clone(),
                url.clone(),
                noisy.clone(),
                a_rate,
                seconds,
                2,
            ))
        });
        let b = figures(&b.await.expect("tenant B"), seconds);
        let a = match a {
            Some(a) => Some(figures(&a.await.expect("tenant A"), seconds)),
            None => None,
        };
        // B's requests the edge held (a count, not a rate: since it started).
        let held = if flow {
            let text = metrics_text(&client, &edge.metrics_url).await;
            let count = infermesh_integration_tests::scrape::value(
                &text,
                "infermesh_edge_queue_wait_seconds_count",
                &[("tenant", "steady")],
            );
            format!("{:.0}", count.unwrap_or(0.0))
        } else {
            "-".to_string()
        };
        rows.push((name, b, a, held));
        // Let the engines drain between runs.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let _keep = Arc::new(replicas);
    println!(
        "| run | B TTFT p50 | B TTFT p99 | B goodput (TTFT ≤ 2 s) | B held at the edge | A goodput | A shed (503) | failed (A+B) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, b, a, held) in rows {
        let (a_good, a_shed, a_failed) = a
            .as_ref()
            .map_or(("-".to_string(), "-".to_string(), 0), |a| {
                (format!("{:.1}/s", a.goodput), a.shed.to_string(), a.failed)
            });
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.1}/s | {held} | {a_good} | {a_shed} | {} |",
            b.p50.as_secs_f64() * 1000.0,
            b.p99.as_secs_f64() * 1000.0,
            b.goodput,
            b.failed + a_failed,
        );
    }
}
