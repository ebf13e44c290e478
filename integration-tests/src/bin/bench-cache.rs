//! `bench-cache`: latency of a response-cache hit against a miss through a
//! real edge, and the rate of hits one edge serves, in one run on one
//! machine so the figures compare. Starts etcd, a control plane, one
//! simulated vLLM replica (default timings: 5 ms to first token, 10 ms per
//! token) and an edge with the in-memory cache, like the integration tests.
//!
//! `INFERMESH_BIN_DIR=target/release cargo run --release -p infermesh-integration-tests --bin bench-cache`
//! Prints a Markdown table; `--requests N` (default 200), `--concurrency C`
//! (default 32) and `--seconds S` (default 5) for the throughput phase.

use std::time::{Duration, Instant};

use http::Method;
use infermesh_integration_tests::bench::{arg_u64, percentile};
use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::mesh::Mesh;
use serde_json::json;

async fn post(http: &Http, url: &str, body: String) -> (Duration, String) {
    let started = Instant::now();
    let reply = http
        .send(
            Method::POST,
            url,
            Some(body.into()),
            &[("content-type", "application/json")],
        )
        .await
        .expect("the edge answers");
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let outcome = reply
        .headers
        .get("x-infermesh-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("absent")
        .to_string();
    (elapsed, outcome)
}

fn body(prompt: &str) -> String {
    json!({"model": "llama", "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": 16})
    .to_string()
}

#[tokio::main]
async fn main() {
    let requests = arg_u64("--requests", 200) as usize;
    let concurrency = arg_u64("--concurrency", 32) as usize;
    let seconds = arg_u64("--seconds", 5);

    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "llama", "cache_policy": {"enabled": true, "ttl_seconds": 3600}}}),
    )
    .await
    .expect("create model");
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &["--access-log", "false"]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let warm = json!({"model": "llama", "messages": [{"role": "user", "content": "warm"}], "max_tokens": 1});
    mesh.wait_until_served(&url, &warm).await;
    let http = mesh.http.clone();

    // Misses: distinct prompts, each answered by the engine and stored.
    let mut misses = Vec::with_capacity(requests);
    for i in 0..requests {
        let (elapsed, outcome) = post(&http, &url, body(&format!("prompt {i}"))).await;
        assert_eq!(outcome, "miss");
        misses.push(elapsed);
    }
    // Hits: the same prompts again (stores are asynchronous; wait for the last).
    while post(&http, &url, body(&format!("prompt {}", requests - 1)))
        .await
        .1
        != "hit"
    {
        tokio::task::yield_now().await;
    }
    let mut hits = Vec::with_capacity(requests);
    for i in 0..requests {
        let (elapsed, outcome) = post(&http, &url, body(&format!("prompt {i}"))).await;
        assert_eq!(outcome, "hit");
        hits.push(elapsed);
    }
    misses.sort();
    hits.sort();

    // Hit throughput: `concurrency` clients for `seconds`.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut clients = Vec::with_capacity(concurrency);
    for c in 0..concurrency {
        let (http, url) = (http.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = c;
            while Instant::now() < deadline {
                let (_, outcome) =
                    post(&http, &url, body(&format!("prompt {}", i % requests))).await;
                assert_eq!(outcome, "hit");
                done += 1;
                i += concurrency;
            }
            done
        }));
    }
    let mut total = 0u64;
    for client in clients {
        total += client.await.expect("client task");
    }
    let rate = total as f64 / seconds as f64;

    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    println!("| measure | miss (engine) | hit (cache) | miss / hit |");
    println!("|---|---|---|---|");
    for (name, p) in [("p50 latency, ms", 0.5), ("p99 latency, ms", 0.99)] {
        let (m, h) = (percentile(&misses, p), percentile(&hits, p));
        println!(
            "| {name} | {} | {} | {:.0}x |",
            ms(m),
            ms(h),
            m.as_secs_f64() / h.as_secs_f64()
        );
    }
    println!("| hits served per second, {concurrency} clients for {seconds} s | | {rate:.0} | |");
    println!(
        "\n{requests} sequential misses (16 output tokens each), then the same {requests} requests as hits, one client, over HTTP/1.1 keep-alive on loopback."
    );
}
