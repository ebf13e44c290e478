//! `bench-routing`: replica choice, side by side, on one simulated fleet.
//!
//! Eight simulated vLLM replicas with a small KV cache (so where a prompt
//! goes decides whether its prefix is cached), a workload of multi-turn
//! sessions sharing 16 long system prompts, Poisson arrivals at 50/80/95% of
//! the fleet's measured capacity; for each router: mean and p99 time to
//! first token, throughput, and the engines' prefix-cache hit rate. Routers:
//! infermesh's edge (round robin, least outstanding, prefix affinity; the
//! full path edge → sidecar → engine) and, when installed, vllm-router and
//! sglang-router straight in front of the engines (cache_aware and
//! power_of_two). Each run salts the system prompts, so no run inherits
//! another's cache.
//!
//! ```sh
//! python3 -m venv .tools/router-venv && .tools/router-venv/bin/pip install vllm-router sglang-router
//! cargo build --release --workspace --bins
//! INFERMESH_BIN_DIR=target/release target/release/bench-routing [--seconds 15]
//! ```
//! Prints a Markdown table.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::BodyExt;
use infermesh_integration_tests::bench::arg_u64;
use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::mesh::{Mesh, Replica};
use infermesh_integration_tests::process::Process;
use infermesh_integration_tests::wait;
use infermesh_runtime::http::{UpstreamClient, full, upstream_client};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const REPLICAS: usize = 8;
const SYSTEM_PROMPTS: usize = 16;
const TURNS: usize = 4;
const ENGINE_FLAGS: &[&str] = &[
    "--max-num-seqs",
    "4",
    "--prefill-us-per-token",
    "400",
    "--decode-ms-per-token",
    "20",
    "--kv-cache-blocks",
    "400",
];

/// One request of the workload: which session, which turn, and its body.
#[derive(Clone)]
struct Planned {
    body: String,
}

/// Sessions over shared system prompts, `count` requests in arrival order.
fn workload(seed: u64, salt: &str, count: usize) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let words = [
        "the", "mesh", "routes", "tokens", "to", "a", "warm", "replica", "with", "its", "prefix",
        "cache", "policy", "region", "edge", "sidecar",
    ];
    let systems: Vec<String> = (0..SYSTEM_PROMPTS)
        .map(|g| {
            let text: Vec<&str> = (0..900)
                .map(|i| words[(i * 7 + g * 13) % words.len()])
                .collect();
            format!("{salt} system prompt {g}: {}", text.join(" "))
        })
        .collect();
    // Sessions: each has a system prompt and advances one turn per request.
    let mut sessions: Vec<(usize, Vec<Value>)> = Vec::new();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let pick = if sessions.is_empty() || rng.random_bool(0.35) {
            let group = rng.random_range(0..SYSTEM_PROMPTS);
            sessions.push((
                group,
                vec![json!({"role": "system", "content": systems[group]})],
            ));
            sessions.len() - 1
        } else {
            rng.random_range(0..sessions.len())
        };
        let (_, messages) = &mut sessions[pick];
        messages.push(json!({"role": "user", "content": format!("question {i}: how does {} work?", words[i % words.len()])}));
        let body = json!({"model": "chat", "messages": messages, "max_tokens": 8, "stream": true,
            "temperature": 0.8});
        out.push(Planned {
            body: body.to_string(),
        });
        messages
            .push(json!({"role": "assistant", "content": "it routes tokens to a warm replica"}));
        if messages.len() > 1 + 2 * TURNS {
            sessions.swap_remove(pick);
        }
    }
    out
}

/// Sends one streamed request; returns the time to its first content byte, or None on failure.
async fn send(
    client: &UpstreamClient,
    url: &str,
    key: Option<&str>,
    body: String,
) -> Option<Duration> {
    let started = Instant::now();
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = client.request(request.body(full(body)).ok()?).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(data) = frame.data_ref()
            && first.is_none()
            && String::from_utf8_lossy(data).contains("\"content\"")
        {
            first = Some(started.elapsed());
        }
    }
    first
}

/// Prefix-cache queries and hits summed over the engines.
async fn cache_counters(client: &UpstreamClient, replicas: &[Replica]) -> (f64, f64) {
    let (mut queries, mut hits) = (0.0, 0.0);
    for replica in replicas {
        let uri = format!("{}/metrics", replica.engine_url);
        let Ok(request) = Request::get(uri).body(full("")) else {
            continue;
        };
        let Ok(response) = client.request(request).await else {
            continue;
        };
        let Ok(body) = response.into_body().collect().await else {
            continue;
        };
        for line in String::from_utf8_lossy(&body.to_bytes()).lines() {
            let value = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if line.starts_with("vllm:prefix_cache_queries_total") {
                queries += value;
            } else if line.starts_with("vllm:prefix_cache_hits_total") {
                hits += value;
            }
        }
    }
    (queries, hits)
}

struct Outcome {
    mean_ttft: Duration,
    p99_ttft: Duration,
    throughput: f64,
    hit_rate: f64,
    failed: usize,
}

/// Poisson arrivals at `rate` per second for `seconds` against `url`.
async fn run(
    client: &UpstreamClient,
    url: &str,
    key: Option<&str>,
    replicas: &[Replica],
    rate: f64,
    seconds: u64,
    salt: &str,
) -> Outcome {
    let count = (rate * seconds as f64).ceil() as usize;
    let plan = workload(7, salt, count);
    let mut rng = StdRng::seed_from_u64(11);
    let (q0, h0) = cache_counters(client, replicas).await;
    let started = Instant::now();
    let mut at = Duration::ZERO;
    let mut tasks = Vec::with_capacity(count);
    for planned in plan {
        let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / rate;
        at += Duration::from_secs_f64(gap);
        tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
        let (client, url, key) = (client.clone(), url.to_string(), key.map(String::from));
        tasks.push(tokio::spawn(async move {
            send(&client, &url, key.as_deref(), planned.body).await
        }));
    }
    let mut ttfts = Vec::new();
    let mut failed = 0;
    for task in tasks {
        match task.await.ok().flatten() {
            Some(ttft) => ttfts.push(ttft),
            None => failed += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (q1, h1) = cache_counters(client, replicas).await;
    ttfts.sort();
    let mean = ttfts.iter().sum::<Duration>() / ttfts.len().max(1) as u32;
    let p99 = ttfts
        .get(((ttfts.len() as f64 - 1.0) * 0.99).round() as usize)
        .copied()
        .unwrap_or_default();
    Outcome {
        mean_ttft: mean,
        p99_ttft: p99,
        throughput: ttfts.len() as f64 / elapsed,
        hit_rate: if q1 > q0 { (h1 - h0) / (q1 - q0) } else { 0.0 },
        failed,
    }
}

/// Closed-loop saturation under round robin: the fleet's capacity, requests/s.
async fn capacity(client: &UpstreamClient, url: &str, key: &str, seconds: u64) -> f64 {
    let plan = Arc::new(workload(3, "[capacity]", 4000));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for w in 0..(REPLICAS * 6) {
        let (client, url, key, plan) = (
            client.clone(),
            url.to_string(),
            key.to_string(),
            plan.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                if send(&client, &url, Some(&key), plan[i % plan.len()].body.clone())
                    .await
                    .is_some()
                {
                    done += 1;
                }
                i += REPLICAS * 6;
            }
            done
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap_or(0);
    }
    total as f64 / seconds as f64
}

fn router_binary(name: &str) -> Option<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../.tools/router-venv/bin/{name}"));
    path.exists().then_some(path)
}

/// Starts a peer router in front of the engines; returns its chat URL.
async fn start_peer(
    mesh: &Mesh,
    name: &str,
    policy: &str,
    replicas: &[Replica],
) -> Option<(String, Process)> {
    let binary = router_binary(name)?;
    let port = free_port();
    let mut args: Vec<String> = Vec::new();
    if name == "sglang-router" {
        args.push("launch".into());
    }
    args.extend(
        [
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--policy",
            policy,
        ]
        .map(String::from),
    );
    args.push("--worker-urls".into());
    args.extend(replicas.iter().map(|r| r.engine_url.clone()));
    let process = Process::spawn(
        &format!("{name}-{policy}"),
        &binary,
        &args,
        mesh.dir.path(),
        &[],
    );
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let client = upstream_client(Duration::from_secs(2));
    let probe = json!({"model": "chat", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 1, "stream": true}).to_string();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if send(&client, &url, None, probe.clone()).await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if ready.is_err() {
        eprintln!("{name} --policy {policy} did not serve within 60 s; skipped");
        return None;
    }
    Some((url, process))
}

/// The routing-table version the edge holds, from its metrics.
async fn table_version(mesh: &Mesh, edge: &infermesh_integration_tests::mesh::Edge) -> f64 {
    let text = mesh
        .http
        .get(&edge.metrics_url)
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("infermesh_edge_routing_table_version"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let seconds = arg_u64("--seconds", 15);
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "chat", "routing_policy": "ROUND_ROBIN"}}),
    )
    .await
    .expect("create model");
    mesh.register("eu-west", "chat", "chat-eu").await;
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        replicas.push(
            mesh.start_replica(
                &format!("chat-{i}"),
                "chat-eu",
                "chat",
                "eu-west",
                ENGINE_FLAGS,
            )
            .await,
        );
    }
    let edge = mesh
        .start_edge("eu-west", &["--access-log", "false", "--cache", "none"])
        .await;
    let edge_url = format!("{}/v1/chat/completions", edge.url);
    wait::until("all replicas routable", Duration::from_secs(30), || async {
        (mesh.endpoint_ids("chat-eu").await.len() == REPLICAS).then_some(())
    })
    .await;
    let client = upstream_client(Duration::from_secs(2));
    let key = mesh.api_key.clone();

    let capacity = capacity(&client, &edge_url, &key, seconds.min(10)).await;
    eprintln!("fleet capacity under round robin: {capacity:.1} requests/s");

    let mut rows: Vec<(String, f64, Outcome)> = Vec::new();
    let mut run_id = 0;
    for level in [0.5, 0.8, 0.95] {
        let rate = capacity * level;
        for policy in ["ROUND_ROBIN", "LEAST_OUTSTANDING", "PREFIX_AFFINITY"] {
            let model = mesh
                .admin("GetModel", json!({"name": "chat"}))
                .await
                .unwrap();
            let mut updated = model.clone();
            updated["routingPolicy"] = json!(policy);
            let version = table_version(&mesh, &edge).await;
            mesh.admin("UpdateModel", json!({"model": updated}))
                .await
                .unwrap();
            wait::until(
                "the edge to apply the new policy",
                Duration::from_secs(10),
                || async { (table_version(&mesh, &edge).await > version).then_some(()) },
            )
            .await;
            run_id += 1;
            let outcome = run(
                &client,
                &edge_url,
                Some(&key),
                &replicas,
                rate,
                seconds,
                &format!("[run {run_id}]"),
            )
            .await;
            rows.push((
                format!("infermesh {}", policy.to_lowercase()),
                level,
                outcome,
            ));
        }
        for (name, policy) in [
            ("vllm-router", "cache_aware"),
            ("vllm-router", "power_of_two"),
            ("sglang-router", "cache_aware"),
            ("sglang-router", "power_of_two"),
        ] {
            let Some((url, _router)) = start_peer(&mesh, name, policy, &replicas).await else {
                continue;
            };
            run_id += 1;
            let outcome = run(
                &client,
                &url,
                None,
                &replicas,
                rate,
                seconds,
                &format!("[run {run_id}]"),
            )
            .await;
            rows.push((format!("{name} {policy}"), level, outcome));
        }
    }

    println!(
        "Fleet capacity (round robin, closed loop): {capacity:.1} requests/s; {seconds} s per run.\n"
    );
    println!(
        "| load | router and policy | mean TTFT ms | p99 TTFT ms | throughput req/s | prefix-cache hit rate | failed |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, level, o) in &rows {
        let line = format!(
            "| {:.0}% | {name} | {:.0} | {:.0} | {:.1} | {:.0}% | {} |",
            level * 100.0,
            o.mean_ttft.as_secs_f64() * 1000.0,
            o.p99_ttft.as_secs_f64() * 1000.0,
            o.throughput,
            o.hit_rate * 100.0,
            o.failed
        );
        println!("{line}");
    }
}
