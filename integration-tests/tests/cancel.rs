//! A client that goes away cancels its request all the way to the engine,
//! through the edge and the sidecar, streamed or not: the simulated engine
//! counts the request aborted within a second, stops generating, and the
//! caller's token reservation keeps only what was produced.

use std::time::{Duration, Instant};

use infermesh_integration_tests::client::{Http, open_post, read_first_event};
use infermesh_integration_tests::mesh::{Edge, Mesh, Replica};
use infermesh_integration_tests::{scrape, wait};
use serde_json::json;
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(20);
/// How soon the engine must have let go of a request whose client left.
const ABORTED_WITHIN: Duration = Duration::from_secs(1);
const TOKENS_PER_MINUTE: u64 = 10_000;

/// The engine's counter or gauge `name` with `labels`, 0 when absent.
async fn engine_metric(mesh: &Mesh, replica: &Replica, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = mesh
        .http
        .get(&format!("{}/metrics", replica.engine_url))
        .await
        .expect("engine metrics")
        .text();
    scrape::value(&text, name, labels).unwrap_or(0.0)
}

/// One slow replica (20 ms a token) behind an edge, and a key limited in
/// tokens per minute, known to the edge.
async fn slow_fleet() -> (Mesh, Replica, Edge, String) {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let replica = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--decode-ms-per-token", "20"],
        )
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let key = mesh
        .create_key(
            "cancel",
            json!({"limits": {"tokens_per_minute": TOKENS_PER_MINUTE}}),
        )
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": "llama", "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]});
    wait::until("the key and the model at the edge", DEADLINE, || async {
        (Http::with_key(&key)
            .post_json(&url, &probe)
            .await
            .ok()?
            .status
            == 200)
            .then_some(())
    })
    .await;
    (mesh, replica, edge, key)
}

/// Sends a 500-token chat request over a connection of its own.
async fn send_long(edge: &Edge, key: &str, stream: bool) -> TcpStream {
    let body = json!({"model": "llama", "stream": stream, "max_tokens": 500,
        "messages": [{"role": "user", "content": "a long answer"}]});
    open_post(&edge.url, "/v1/chat/completions", key, &body.to_string()).await
}

/// Waits until the engine counts one more abort than `before`, within
/// ABORTED_WITHIN of `left`; and until it runs nothing.
async fn aborted(mesh: &Mesh, replica: &Replica, before: f64, left: Instant) {
    let abort = [("finished_reason", "abort")];
    wait::until(
        "the engine to abort the request",
        ABORTED_WITHIN,
        || async {
            (engine_metric(mesh, replica, "vllm:request_success_total", &abort).await > before)
                .then_some(())
        },
    )
    .await;
    println!("aborted {:?} after the client left", left.elapsed());
    wait::until("the engine to run nothing", DEADLINE, || async {
        (engine_metric(mesh, replica, "vllm:num_requests_running", &[]).await == 0.0).then_some(())
    })
    .await;
}

/// Tokens left of the key's limit, as the edge's next answer reports them.
async fn tokens_left(edge: &Edge, key: &str) -> u64 {
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]});
    let reply = Http::with_key(key).post_json(&url, &body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_streamed_request_whose_client_leaves_is_aborted_and_charged_what_it_streamed() {
    let (mesh, replica, edge, key) = slow_fleet().await;
    let abort = [("finished_reason", "abort")];
    let before = engine_metric(&mesh, &replica, "vllm:request_success_total", &abort).await;
    let generated = engine_metric(&mesh, &replica, "vllm:generation_tokens_total", &[]).await;
    let mut socket = send_long(&edge, &key, true).await;
    read_first_event(&mut socket, DEADLINE).await;
    drop(socket);
    aborted(&mesh, &replica, before, Instant::now()).await;
    let produced =
        engine_metric(&mesh, &replica, "vllm:generation_tokens_total", &[]).await - generated;
    assert!(
        produced < 100.0,
        "generation stopped early: {produced} of 500"
    );
    // The 500-token reservation was settled to what was produced: about
    // the prompt and the few chunks streamed, not the 500 reserved.
    let left = tokens_left(&edge, &key).await;
    assert!(
        left > TOKENS_PER_MINUTE - 150,
        "{left} of {TOKENS_PER_MINUTE} tokens left: the reservation stood"
    );
    let edge_metrics = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    assert!(
        edge_metrics
            .lines()
            .any(|l| l.starts_with("infermesh_edge_requests_total{")
                && l.contains("client_cancelled")),
        "the edge counted the request as cancelled"
    );
}

#[tokio::test]
async fn a_request_whose_client_leaves_before_the_answer_is_aborted_in_the_engine() {
    let (mesh, replica, edge, key) = slow_fleet().await;
    let abort = [("finished_reason", "abort")];
    let before = engine_metric(&mesh, &replica, "vllm:request_success_total", &abort).await;
    let socket = send_long(&edge, &key, false).await;
    wait::until("the request to run in the engine", DEADLINE, || async {
        (engine_metric(&mesh, &replica, "vllm:num_requests_running", &[]).await >= 1.0)
            .then_some(())
    })
    .await;
    drop(socket);
    aborted(&mesh, &replica, before, Instant::now()).await;
    let left = tokens_left(&edge, &key).await;
    assert!(
        left > TOKENS_PER_MINUTE - 150,
        "{left} of {TOKENS_PER_MINUTE} tokens left: the reservation stood"
    );
}
