//! The edge as the official OpenAI Python SDK sees it: the model list with
//! aliases and access filtering, streams that keep every field the engine
//! sends, the Responses API, and the other OpenAI-compatible paths vLLM
//! serves (integration-tests/sdk/openai_client.py holds the expectations);
//! and the SDK's own retry waiting as a 429's `Retry-After` says
//! (integration-tests/sdk/retry_after.py).

use std::path::PathBuf;
use std::time::Duration;

use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::mesh::{Edge, Mesh};
use infermesh_integration_tests::wait;
use serde_json::json;

/// Waits until `key` is in the table `edge` holds.
async fn key_at_edge(key: &str, edge: &Edge) {
    let models = format!("{}/v1/models", edge.url);
    wait::until(
        "the key to reach the edge",
        Duration::from_secs(20),
        || async { (Http::with_key(key).get(&models).await.ok()?.status == 200).then_some(()) },
    )
    .await;
}

/// Runs `script` of integration-tests/sdk with the SDK's venv and `env`;
/// asserts it succeeded and said so.
async fn run_script(script: &str, env: &[(&str, &str)]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".tools/sdk-venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: scripts/install-deps.sh installs it (the test command runs it first)",
        python.display()
    );
    let run = tokio::process::Command::new(&python)
        .arg(root.join("integration-tests/sdk").join(script))
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the SDK script finishes within two minutes")
        .expect("the SDK script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(r#""ok": true"#),
        "stdout: {stdout}\nstderr: {stderr}"
    );
}

#[tokio::test]
async fn the_openai_sdk_sees_the_models_streams_and_paths_it_expects() {
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": "llama", "aliases": ["llama-8b"]}}),
    )
    .await
    .expect("create model");
    mesh.register("eu-west", "llama", "llama-eu").await;
    mesh.register("eu-west", "hidden", "hidden-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": "llama", "max_tokens": 1,
        "messages": [{"role": "user", "content": "probe"}]});
    mesh.wait_until_served(&url, &probe).await;
    let key = mesh
        .create_key("sdk", json!({"allowed_models": ["llama"]}))
        .await;
    key_at_edge(&key, &edge).await;
    run_script(
        "openai_client.py",
        &[
            ("EDGE_URL", &edge.url),
            ("API_KEY", &key),
            ("MODEL", "llama"),
            ("ALIAS", "llama-8b"),
            ("HIDDEN", "hidden"),
        ],
    )
    .await;
}

#[tokio::test]
async fn the_openai_sdk_waits_as_retry_after_says_and_gets_through() {
    const LIMIT: u64 = 60;
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--decode-ms-per-token", "0"],
        )
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let key = mesh
        .create_key("retry", json!({"limits": {"requests_per_minute": LIMIT}}))
        .await;
    key_at_edge(&key, &edge).await;
    run_script(
        "retry_after.py",
        &[
            ("EDGE_URL", &edge.url),
            ("EDGE_METRICS_URL", &edge.metrics_url),
            ("API_KEY", &key),
            ("MODEL", "llama"),
            ("LIMIT", &LIMIT.to_string()),
        ],
    )
    .await;
}
