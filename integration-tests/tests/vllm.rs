//! The system in front of real vLLM engines (CPU build, a tiny random-weight
//! Llama) instead of the simulated ones: the OpenAI SDK's streams, usage and
//! fingerprint; the sidecar reading vLLM's own metrics; prefix affinity
//! landing a conversation where vLLM's prefix cache holds it; a client that
//! goes away aborting the request inside vLLM; a sidecar draining a vLLM
//! stream; a LoRA adapter loaded through the sidecar on its first request.
//! vLLM takes a minute to start and its install is about 6 GB, so
//! these run from `scripts/test-vllm.sh`, which starts two engines and
//! passes them in INFERMESH_VLLM_URLS (comma-separated) with the name they
//! serve in INFERMESH_VLLM_MODEL; `cargo test` alone skips them (ignored).

use std::path::PathBuf;
use std::time::Duration;

use infermesh_integration_tests::client::{Http, open_post, read_first_event};
use infermesh_integration_tests::mesh::{Edge, Mesh, Sidecar};
use infermesh_integration_tests::wait;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);
const POOL: &str = "tiny-eu";
const ALIAS: &str = "tiny";

/// The engines scripts/test-vllm.sh started, and the model name they serve.
fn engines() -> (Vec<String>, String) {
    let urls = std::env::var("INFERMESH_VLLM_URLS")
        .expect("INFERMESH_VLLM_URLS: run these through scripts/test-vllm.sh");
    let model = std::env::var("INFERMESH_VLLM_MODEL").expect("INFERMESH_VLLM_MODEL");
    (urls.split(',').map(String::from).collect(), model)
}

/// A mesh whose eu-west pool is the real engines, each behind a sidecar,
/// with the model under `policy`; returns once the edge serves it.
struct Fleet {
    mesh: Mesh,
    edge: Edge,
    sidecars: Vec<Sidecar>,
    engines: Vec<String>,
    model: String,
    url: String,
}

async fn fleet(policy: &str) -> Fleet {
    let (engines, model) = engines();
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateModel",
        json!({"model": {"name": model, "aliases": [ALIAS], "routing_policy": policy}}),
    )
    .await
    .expect("create model");
    mesh.register("eu-west", &model, POOL).await;
    let mut sidecars = Vec::new();
    for (i, engine) in engines.iter().enumerate() {
        sidecars.push(
            mesh.start_sidecar(&format!("tiny-{i}"), POOL, &model, "eu-west", engine, None)
                .await,
        );
    }
    let edge = mesh.start_edge("eu-west", &[]).await;
    wait::until("every engine registered", DEADLINE, || async {
        (mesh.endpoint_ids(POOL).await.len() == engines.len()).then_some(())
    })
    .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let probe = json!({"model": ALIAS, "max_tokens": 1,
        "messages": [{"role": "user", "content": "probe"}]});
    mesh.wait_until_served(&url, &probe).await;
    Fleet {
        mesh,
        edge,
        sidecars,
        engines,
        model,
        url,
    }
}

/// The sum of the vLLM counter or gauge `name` (all label sets) of `engine`.
async fn engine_metric(http: &Http, engine: &str, name: &str, label: Option<&str>) -> f64 {
    let text = http
        .get(&format!("{engine}/metrics"))
        .await
        .expect("vLLM /metrics")
        .text();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| label.is_none_or(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `engine_metric` for every engine of the fleet.
async fn per_engine(fleet: &Fleet, name: &str, label: Option<&str>) -> Vec<f64> {
    let mut values = Vec::new();
    for engine in &fleet.engines {
        values.push(engine_metric(&fleet.mesh.http, engine, name, label).await);
    }
    values
}

#[tokio::test]
#[ignore = "needs real vLLM engines: scripts/test-vllm.sh"]
async fn the_openai_sdk_streams_with_usage_and_the_engines_fingerprint() {
    let fleet = fleet("LEAST_OUTSTANDING").await;
    let mesh = &fleet.mesh;
    mesh.register("eu-west", "hidden", "hidden-eu").await;
    let key = mesh
        .create_key("sdk", json!({"allowed_models": [fleet.model]}))
        .await;
    let models = format!("{}/v1/models", fleet.edge.url);
    wait::until("the key to reach the edge", DEADLINE, || async {
        (Http::with_key(&key).get(&models).await.ok()?.status == 200).then_some(())
    })
    .await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = tokio::process::Command::new(root.join(".tools/sdk-venv/bin/python"))
        .arg(root.join("integration-tests/sdk/openai_client.py"))
        .env("EDGE_URL", &fleet.edge.url)
        .env("API_KEY", &key)
        .env("MODEL", &fleet.model)
        .env("ALIAS", ALIAS)
        .env("HIDDEN", "hidden")
        .env("ENGINE", "vllm")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("system_fingerprint='vllm-"), "{stdout}");
}

#[tokio::test]
#[ignore = "needs real vLLM engines: scripts/test-vllm.sh"]
async fn sidecars_read_vllms_own_metrics_and_stamp_its_load() {
    let fleet = fleet("LEAST_LOAD").await;
    for sidecar in &fleet.sidecars {
        wait::until("the sidecar to scrape its engine", DEADLINE, || async {
            let text = fleet.mesh.http.get(&sidecar.metrics_url).await.ok()?.text();
            let up = text
                .lines()
                .any(|l| l.starts_with("infermesh_sidecar_engine_up{") && l.ends_with(" 1"));
            let kv = text
                .lines()
                .any(|l| l.starts_with("infermesh_sidecar_engine_kv_cache_usage_ratio{"));
            (up && kv).then_some(())
        })
        .await;
    }
    // The load each sidecar stamps on vLLM's answers reaches the edge.
    for _ in 0..4 {
        let body = json!({"model": ALIAS, "max_tokens": 4,
            "messages": [{"role": "user", "content": "load"}]});
        let reply = fleet.mesh.http.post_json(&fleet.url, &body).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let explained = fleet
        .mesh
        .admin(
            "ExplainRoute",
            json!({"region": "eu-west", "model": ALIAS, "prompt": "load"}),
        )
        .await
        .expect("explain");
    let stamped = explained["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter(|c| c["load"].is_object())
        .count();
    assert!(
        stamped >= 1,
        "a fresh vLLM load stamp at the edge: {explained}"
    );
    let endpoints = fleet
        .mesh
        .admin("ListEndpoints", json!({"pool": POOL}))
        .await
        .expect("list endpoints");
    println!("endpoints as reported from vLLM: {endpoints}");
}

#[tokio::test]
#[ignore = "needs real vLLM engines: scripts/test-vllm.sh"]
async fn prefix_affinity_keeps_a_conversation_where_vllms_prefix_cache_holds_it() {
    let fleet = fleet("PREFIX_AFFINITY").await;
    let system = "You are the support assistant for a mesh of inference servers. ".repeat(10);
    let mut messages = vec![json!({"role": "system", "content": system})];
    let finished_before = per_engine(&fleet, "vllm:request_success_total", None).await;
    let hits_before = per_engine(&fleet, "vllm:prefix_cache_hits_total", None).await;
    for turn in 0..4 {
        messages.push(json!({"role": "user", "content": format!("question {turn} about routing")}));
        let body = json!({"model": ALIAS, "messages": messages, "max_tokens": 8});
        let reply = fleet.mesh.http.post_json(&fleet.url, &body).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer = reply.json()["choices"][0]["message"]["content"].clone();
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    let finished: Vec<f64> = per_engine(&fleet, "vllm:request_success_total", None)
        .await
        .iter()
        .zip(&finished_before)
        .map(|(a, b)| a - b)
        .collect();
    let hits: Vec<f64> = per_engine(&fleet, "vllm:prefix_cache_hits_total", None)
        .await
        .iter()
        .zip(&hits_before)
        .map(|(a, b)| a - b)
        .collect();
    println!("turns served per engine: {finished:?}; prefix-cache hit tokens: {hits:?}");
    let holder = finished
        .iter()
        .position(|&n| n == 4.0)
        .unwrap_or_else(|| panic!("every turn on one engine: {finished:?}"));
    assert!(
        hits[holder] > 0.0,
        "vLLM reused the cached prefix on that engine: {hits:?}"
    );
}

#[tokio::test]
#[ignore = "needs real vLLM engines: scripts/test-vllm.sh"]
async fn a_client_that_goes_away_aborts_its_request_inside_vllm() {
    let fleet = fleet("LEAST_OUTSTANDING").await;
    let key = fleet.mesh.create_key("gone", json!({})).await;
    let models = format!("{}/v1/models", fleet.edge.url);
    wait::until("the key to reach the edge", DEADLINE, || async {
        (Http::with_key(&key).get(&models).await.ok()?.status == 200).then_some(())
    })
    .await;
    // vLLM counts an aborted request neither as finished nor by its tokens
    // asked for: what shows the abort is a request that stops running long
    // before its 1500 tokens, and never finishes.
    let finished_before = per_engine(&fleet, "vllm:request_success_total", None).await;
    let tokens_before = per_engine(&fleet, "vllm:generation_tokens_total", None).await;
    let body = json!({"model": ALIAS, "stream": true, "max_tokens": 1500, "ignore_eos": true,
        "messages": [{"role": "user", "content": "a long answer, please"}]});
    let mut socket = open_post(
        &fleet.edge.url,
        "/v1/chat/completions",
        &key,
        &body.to_string(),
    )
    .await;
    read_first_event(&mut socket, DEADLINE).await;
    drop(socket);
    wait::until("vLLM to stop running the request", DEADLINE, || async {
        let running = per_engine(&fleet, "vllm:num_requests_running", None).await;
        running.iter().all(|&n| n == 0.0).then_some(())
    })
    .await;
    let sum = |after: Vec<f64>, before: &[f64]| -> f64 {
        after.iter().zip(before).map(|(a, b)| a - b).sum()
    };
    let finished = sum(
        per_engine(&fleet, "vllm:request_success_total", None).await,
        &finished_before,
    );
    let tokens = sum(
        per_engine(&fleet, "vllm:generation_tokens_total", None).await,
        &tokens_before,
    );
    println!("after the disconnect: {tokens} tokens generated of 1500, {finished} finished");
    assert_eq!(finished, 0.0, "the request never finished: vLLM aborted it");
    assert!(tokens < 1500.0, "vLLM stopped generating: {tokens} tokens");
    wait::until(
        "the edge to count a cancelled request",
        DEADLINE,
        || async {
            let text = fleet
                .mesh
                .http
                .get(&fleet.edge.metrics_url)
                .await
                .ok()?
                .text();
            text.lines()
                .any(|l| {
                    l.starts_with("infermesh_edge_requests_total{")
                        && l.contains("client_cancelled")
                })
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs real vLLM engines: scripts/test-vllm.sh"]
async fn a_draining_sidecar_finishes_its_vllm_stream_and_leaves() {
    let mut fleet = fleet("LEAST_OUTSTANDING").await;
    let body = json!({"model": ALIAS, "stream": true, "max_tokens": 1500, "ignore_eos": true,
        "messages": [{"role": "user", "content": "a long answer, please"}]});
    let http = fleet.mesh.http.clone();
    let url = fleet.url.clone();
    let in_flight = tokio::spawn(async move { http.post_stream(&url, &body).await });
    let running = wait::until("the stream to run in vLLM", DEADLINE, || async {
        let running = per_engine(&fleet, "vllm:num_requests_running", None).await;
        running.iter().position(|&n| n >= 1.0)
    })
    .await;
    let sidecar = &mut fleet.sidecars[running];
    let code = sidecar.process.terminate().await;
    assert_eq!(code, Some(0), "the sidecar exits cleanly after draining");
    let streamed = in_flight.await.unwrap().unwrap();
    assert_eq!(streamed.status, 200);
    let events = streamed.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream finished"
    );
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    assert!(
        chunks.len() > 1000,
        "all 1500 tokens came: {}",
        chunks.len()
    );
    let left = format!("tiny-{running}");
    wait::until(
        "the drained endpoint to leave the registry",
        DEADLINE,
        || async { (!fleet.mesh.endpoint_ids(POOL).await.contains(&left)).then_some(()) },
    )
    .await;
    // The other engine serves what comes next.
    let after = json!({"model": ALIAS, "max_tokens": 2,
        "messages": [{"role": "user", "content": "still there?"}]});
    let reply = fleet.mesh.http.post_json(&fleet.url, &after).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// The LoRA adapters `engine` lists in `/v1/models` (entries with a parent).
async fn engine_adapters(http: &Http, engine: &str) -> Vec<(String, String)> {
    let models = http
        .get(&format!("{engine}/v1/models"))
        .await
        .expect("vLLM /v1/models")
        .json();
    models["data"]
        .as_array()
        .map(|data| {
            data.iter()
                .filter(|m| m["parent"].is_string())
                .map(|m| {
                    let field = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                    (field("id"), field("parent"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
#[ignore = "needs real vLLM engines: scripts/test-vllm.sh"]
async fn a_lora_adapter_is_loaded_through_the_sidecar_on_its_first_request() {
    let source = std::env::var("INFERMESH_VLLM_LORA").expect("INFERMESH_VLLM_LORA");
    let fleet = fleet("LEAST_OUTSTANDING").await;
    let mesh = &fleet.mesh;
    mesh.admin(
        "CreateAdapter",
        json!({"adapter": {"name": "tiny-support", "base_model": fleet.model,
            "source": source, "version": "r1"}}),
    )
    .await
    .expect("CreateAdapter");
    for engine in &fleet.engines {
        assert!(engine_adapters(&mesh.http, engine).await.is_empty());
    }
    let body = json!({"model": "tiny-support", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello adapter"}]});
    // Until every sidecar holds the table naming the adapter, a sidecar
    // that does not know it answers 404 and loads nothing.
    let first = wait::until("the adapter to be served", DEADLINE, || async {
        let reply = mesh.http.post_json(&fleet.url, &body).await.ok()?;
        (reply.status == 200).then_some(reply)
    })
    .await;
    println!("first answer: {}", first.text());
    assert_eq!(first.json()["model"], "tiny-support");
    let mut holders = Vec::new();
    for engine in &fleet.engines {
        let adapters = engine_adapters(&mesh.http, engine).await;
        println!("{engine} adapters: {adapters:?}");
        if !adapters.is_empty() {
            assert_eq!(
                adapters,
                [("tiny-support".to_string(), fleet.model.clone())]
            );
            holders.push(engine.clone());
        }
    }
    assert_eq!(holders.len(), 1, "loaded on one engine");
    // Later requests are served by the holder; no other engine loads it.
    for _ in 0..4 {
        let reply = mesh.http.post_json(&fleet.url, &body).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let mut loaded = 0;
    for engine in &fleet.engines {
        loaded += engine_adapters(&mesh.http, engine).await.len();
    }
    assert_eq!(loaded, 1);
}
