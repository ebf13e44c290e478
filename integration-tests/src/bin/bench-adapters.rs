//! `bench-adapters`: LoRA adapter placement against round robin with load
//! on demand, on one simulated fleet.
//!
//! Eight simulated vLLM replicas with runtime LoRA loading (a load takes
//! 200 ms; 4 adapters in GPU slots, 20 ms to switch one in), each behind a
//! sidecar that keeps at most 8 adapters resident. Fifty adapters on one
//! base model, asked for with Zipf popularity (s = 1) by streamed requests
//! at a steady Poisson rate. Two runs, each on a fresh mesh: the base
//! model under `LEAST_OUTSTANDING` (adapter-aware placement: a holder,
//! else the replica with fewest adapters loads it) and under
//! `ROUND_ROBIN` (every turn loads on demand). For each: adapter loads per
//! minute (the engines' own count), time to first token (mean, p99) and
//! failures, measured after a warm-up of the same traffic (the first load
//! of each adapter, which no placement avoids, is not what is compared).
//!
//! ```sh
//! cargo build --release --workspace --bins
//! INFERMESH_BIN_DIR=target/release target/release/bench-adapters [--seconds 30] [--warmup 20] [--rate 40]
//! ```
//! Prints a Markdown table.

use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::BodyExt;
use infermesh_integration_tests::bench::{arg_u64, percentile};
use infermesh_integration_tests::mesh::{Mesh, Replica};
use infermesh_runtime::http::{UpstreamClient, full, upstream_client};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const REPLICAS: usize = 8;
const ADAPTERS: usize = 50;
const RESIDENT: &str = "8";
const MAX_TOKENS: u64 = 16;
const ENGINE_FLAGS: &[&str] = &[
    "--max-num-seqs",
    "8",
    "--enable-lora",
    "--max-loras",
    "4",
    "--lora-load-ms",
    "200",
    "--lora-switch-ms",
    "20",
];

/// Time to first content chunk, or why there was none.
async fn send(
    client: &UpstreamClient,
    url: &str,
    key: &str,
    model: &str,
) -> Result<Duration, String> {
    let body = json!({"model": model, "stream": true, "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": format!("a question for {model}")}]})
    .to_string();
    let started = Instant::now();
    let request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(full(body))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if first.is_none()
            && frame
                .data_ref()
                .is_some_and(|d| String::from_utf8_lossy(d).contains("\"content\""))
        {
            first = Some(started.elapsed());
        }
    }
    first.ok_or_else(|| "no content".to_string())
}

/// Adapter ranks drawn with Zipf (s = 1) popularity.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize) -> Self {
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / k as f64).collect();
        let sum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        Self(
            weights
                .iter()
                .map(|w| {
                    acc += w / sum;
                    acc
                })
                .collect(),
        )
    }

    fn draw(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.0
            .iter()
            .position(|c| u <= *c)
            .unwrap_or(self.0.len() - 1)
    }
}

/// Adapter loads the engines of `replicas` report.
async fn loads(client: &UpstreamClient, replicas: &[Replica]) -> f64 {
    let mut sum = 0.0;
    for replica in replicas {
        let request = Request::builder()
            .uri(format!("{}/metrics", replica.engine_url))
            .body(full(String::new()))
            .expect("request");
        let Ok(response) = client.request(request).await else {
            continue;
        };
        let Ok(body) = response.into_body().collect().await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        sum += infermesh_integration_tests::scrape::value(&text, "sim:lora_loads_total", &[])
            .unwrap_or(0.0);
    }
    sum
}

/// One run's figures.
struct Figures {
    loads_per_minute: f64,
    mean: Duration,
    p99: Duration,
    served: usize,
    failed: usize,
}

async fn run(policy: &str, warmup: u64, seconds: u64, rate: f64) -> Figures {
    let mut mesh = Mesh::start().await;
    mesh.env
        .push(("INFERMESH_MAX_ADAPTERS".into(), RESIDENT.into()));
    mesh.register("eu-west", "llama", "llama-eu").await;
    let model = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .expect("model");
    mesh.admin(
        "UpdateModel",
        json!({"model": {"name": "llama", "routing_policy": policy, "revision": model["revision"]},
            "update_mask": {"paths": ["routing_policy"]}}),
    )
    .await
    .expect("policy");
    for i in 0..ADAPTERS {
        mesh.admin(
            "CreateAdapter",
            json!({"adapter": {"name": format!("bot-{i}"), "base_model": "llama",
                "source": format!("/adapters/bot-{i}"), "version": "r1"}}),
        )
        .await
        .expect("CreateAdapter");
    }
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
    let key = mesh.api_key.clone();
    let client = upstream_client(Duration::from_secs(2));
    // Every replica in the edge's table and every sidecar knowing the adapters.
    infermesh_integration_tests::wait::until("the fleet", Duration::from_secs(60), || async {
        let mut ready = true;
        for _ in 0..REPLICAS {
            ready &= send(&client, &url, &key, "llama").await.is_ok();
        }
        let listed = mesh.admin("ListSubscribers", json!({})).await.ok()?;
        let sidecars = listed["subscribers"]
            .as_array()?
            .iter()
            .filter(|s| s["role"] == "SIDECAR")
            .count();
        (ready && sidecars == REPLICAS).then_some(())
    })
    .await;
    let zipf = Zipf::new(ADAPTERS);
    let mut rng = StdRng::seed_from_u64(7);
    let measured_from = Instant::now() + Duration::from_secs(warmup);
    let end = measured_from + Duration::from_secs(seconds);
    let mut at = Instant::now();
    let mut calls = Vec::new();
    let mut warm_calls = Vec::new();
    let mut before = None;
    while at < end {
        if before.is_none() && at >= measured_from {
            // The warm-up's answers end before the count is taken.
            for call in warm_calls.drain(..) {
                let _ = tokio::join!(call);
            }
            before = Some(loads(&client, &replicas).await);
            at = Instant::now();
        }
        tokio::time::sleep_until(at.into()).await;
        let model = format!("bot-{}", zipf.draw(&mut rng));
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        let call = tokio::spawn(async move { send(&client, &url, &key, &model).await });
        if before.is_some() {
            calls.push(call);
        } else {
            warm_calls.push(call);
        }
        let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / rate;
        at += Duration::from_secs_f64(gap);
    }
    let mut ttfts = Vec::new();
    let mut failed = 0;
    for call in calls {
        match call.await {
            Ok(Ok(ttft)) => ttfts.push(ttft),
            Ok(Err(error)) => {
                failed += 1;
                eprintln!("{policy}: {error}");
            }
            Err(_) => failed += 1,
        }
    }
    let loaded = loads(&client, &replicas).await - before.unwrap_or(0.0);
    ttfts.sort();
    let mean = ttfts.iter().sum::<Duration>() / ttfts.len().max(1) as u32;
    Figures {
        loads_per_minute: loaded * 60.0 / seconds as f64,
        mean,
        p99: percentile(&ttfts, 0.99),
        served: ttfts.len(),
        failed,
    }
}

#[tokio::main]
async fn main() {
    let seconds = arg_u64("--seconds", 30);
    let warmup = arg_u64("--warmup", 20);
    let rate = arg_u64("--rate", 40) as f64;
    eprintln!(
        "{ADAPTERS} adapters, {REPLICAS} replicas, {rate}/s; {warmup} s warm-up, then {seconds} s measured a run"
    );
    let mut rows = Vec::new();
    for (name, policy) in [
        ("adapter-aware placement", "LEAST_OUTSTANDING"),
        ("round robin, load on demand", "ROUND_ROBIN"),
    ] {
        rows.push((name, run(policy, warmup, seconds, rate).await));
    }
    println!("| run | adapter loads/min | TTFT mean | TTFT p99 | served | failed |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in &rows {
        println!(
            "| {name} | {:.0} | {:.0} ms | {:.0} ms | {} | {} |",
            f.loads_per_minute,
            f.mean.as_secs_f64() * 1000.0,
            f.p99.as_secs_f64() * 1000.0,
            f.served,
            f.failed,
        );
    }
    let (aware, rr) = (&rows[0].1, &rows[1].1);
    println!(
        "\nratios (placement / round robin): loads {:.2}, TTFT mean {:.2}, TTFT p99 {:.2}",
        aware.loads_per_minute / rr.loads_per_minute.max(1e-9),
        aware.mean.as_secs_f64() / rr.mean.as_secs_f64().max(1e-9),
        aware.p99.as_secs_f64() / rr.p99.as_secs_f64().max(1e-9),
    );
}
