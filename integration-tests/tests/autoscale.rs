//! Autoscaling through real processes: the leading control-plane replica
//! decides from load that sidecars report to another replica; a pool that
//! scaled to zero comes back for a request an edge holds, through a
//! Kubernetes API server's scale subresource; a request for a pool that
//! does not come back in time gets a 503.

use std::time::{Duration, Instant};

use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::grpcurl::Grpcurl;
use infermesh_integration_tests::kube::{FakeKube, ScaleChange};
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use infermesh_runtime::tls::PeerRole;
use serde_json::{Value, json};

const FAST: [&str; 4] = [
    "--autoscale-interval-ms",
    "300",
    "--load-exchange-interval-ms",
    "300",
];

fn fast(extra: &[String]) -> Vec<String> {
    FAST.iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect()
}

/// The value of the first series of `name` whose labels include `label`.
fn series(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn count(value: &Value, field: &str) -> u64 {
    value[field].as_u64().unwrap_or(0)
}

async fn scaling(admin: &Grpcurl, pool: &str) -> Option<Value> {
    admin
        .admin("GetPoolScaling", json!({"pool": pool}))
        .await
        .ok()
}

#[tokio::test]
async fn the_leader_scales_on_load_reported_to_another_replica_and_back_down() {
    let mut mesh = Mesh::start_with(&fast(&[])).await;
    let leader_url = mesh.control_plane_metrics_url.clone();
    wait::until(
        "the first replica to lead",
        Duration::from_secs(20),
        || async { mesh.leading(&leader_url).await.filter(|l| *l).map(|_| ()) },
    )
    .await;
    let other_address = format!("127.0.0.1:{}", free_port());
    let other_metrics = format!("127.0.0.1:{}", free_port());
    let _other = mesh.spawn_control_plane("control-plane-b", &other_address, &other_metrics);
    let other_admin = Grpcurl::tls(&other_address, &mesh.pki.ca_cert)
        .with_identity(mesh.pki.client(PeerRole::Admin, "integration-tests"));

    mesh.register("eu-west", "llama", "unused").await;
    // Bad settings are refused by field, nothing is written.
    let refused = mesh
        .admin(
            "CreatePool",
            json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west", "engine": "VLLM",
                "max_replicas": 5, "time_zone": "Mars/Olympus"}}),
        )
        .await
        .expect_err("unknown time zone");
    assert_eq!(refused.code, "InvalidArgument", "{refused:?}");
    assert!(refused.message.starts_with("pool.time_zone"), "{refused:?}");
    let refused = mesh
        .admin(
            "CreatePool",
            json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west", "engine": "VLLM",
                "max_replicas": 5, "floors": [{"start": "22:00", "end": "25:00", "min_replicas": 1}]}}),
        )
        .await
        .expect_err("bad window");
    assert!(
        refused.message.starts_with("pool.floors[0].end"),
        "{refused:?}"
    );
    assert!(
        mesh.admin("GetPool", json!({"name": "llama-eu"}))
            .await
            .is_err()
    );

    mesh.admin(
        "CreatePool",
        json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west", "engine": "VLLM",
            "min_replicas": 1, "max_replicas": 5,
            "scaling_targets": {"waiting_per_replica": 1},
            "behavior": {"scale_down_stabilization_seconds": 2},
            "time_zone": "Europe/Paris"}}),
    )
    .await
    .expect("create pool");

    // The sidecar reports to the replica that does not lead.
    let leader_address = std::mem::replace(&mut mesh.control_plane_address, other_address.clone());
    let replica = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--max-num-seqs", "1", "--decode-ms-per-token", "40"],
        )
        .await;
    mesh.control_plane_address = leader_address;

    let settled = wait::until("a first decision", Duration::from_secs(20), || async {
        scaling(&mesh.admin, "llama-eu")
            .await
            .filter(|s| count(s, "currentReplicas") == 1)
    })
    .await;
    assert_eq!(count(&settled, "desiredReplicas"), 1, "{settled}");
    assert_eq!(settled["decidedBy"], "control-plane", "{settled}");

    // Six requests at once on an engine that runs one at a time: a queue.
    let url = format!("{}/v1/chat/completions", replica.sidecar_url);
    let body = json!({"model": "llama", "max_tokens": 60,
        "messages": [{"role": "user", "content": "tell me a long story"}]});
    let mut requests = Vec::new();
    for _ in 0..6 {
        let (http, url, body) = (mesh.http.clone(), url.clone(), body.clone());
        requests.push(tokio::spawn(
            async move { http.post_json(&url, &body).await },
        ));
    }
    let up = wait::until("a scale-up decision", Duration::from_secs(20), || async {
        scaling(&mesh.admin, "llama-eu")
            .await
            .filter(|s| count(s, "desiredReplicas") >= 4)
    })
    .await;
    let reason = up["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("waiting") && reason.contains("against target 1"),
        "{up}"
    );
    // Every replica tells the same decision; only the leader exports it.
    let told = scaling(&other_admin, "llama-eu")
        .await
        .expect("decision via the other replica");
    assert!(count(&told, "desiredReplicas") >= 4, "{told}");
    let text = mesh
        .http
        .get(&leader_url)
        .await
        .expect("leader metrics")
        .text();
    let desired = series(
        &text,
        "infermesh_pool_desired_replicas",
        "pool=\"llama-eu\"",
    );
    assert!(desired.is_some_and(|d| d >= 4.0), "{desired:?}");
    let other_text = mesh
        .http
        .get(&format!("http://{other_metrics}/metrics"))
        .await
        .expect("other metrics")
        .text();
    assert!(series(&other_text, "infermesh_pool_desired_replicas", "llama-eu").is_none());
    // The admin API of the leader shows the load reported to the other replica.
    let listed = mesh
        .admin("ListEndpoints", json!({"pool": "llama-eu"}))
        .await
        .expect("list endpoints");
    assert!(
        listed["endpoints"][0]["load"]["observedAtUnixMs"].is_string(),
        "{listed}"
    );

    for request in requests {
        let reply = request.await.expect("task").expect("request");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Queue gone: back to one replica after the 2 s down window.
    let down = wait::until("a scale-down decision", Duration::from_secs(20), || async {
        scaling(&mesh.admin, "llama-eu")
            .await
            .filter(|s| count(s, "desiredReplicas") == 1)
    })
    .await;
    assert_eq!(count(&down, "currentReplicas"), 1, "{down}");
}

async fn next_change(kube: &mut FakeKube) -> ScaleChange {
    tokio::time::timeout(Duration::from_secs(30), kube.changes.recv())
        .await
        .expect("a scale change within 30 s")
        .expect("the API server is running")
}

#[tokio::test]
async fn a_pool_scaled_to_zero_comes_back_for_a_held_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut kube = FakeKube::start(dir.path()).await;
    let mesh = Mesh::start_with(&fast(&kube.control_plane_flags())).await;
    mesh.register("eu-west", "llama", "unused").await;
    mesh.admin(
        "CreatePool",
        json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west", "engine": "VLLM",
            "min_replicas": 0, "max_replicas": 2,
            "scale_to_zero_idle_seconds": 2, "cold_start_timeout_seconds": 30,
            "behavior": {"scale_down_stabilization_seconds": 0},
            "scale_target": {"namespace": "gpu", "kind": "Deployment", "name": "llama"}}}),
    )
    .await
    .expect("create pool");
    // A second model whose pool never comes back: its requests time out.
    mesh.register("eu-west", "mistral", "unused-2").await;
    mesh.admin(
        "CreatePool",
        json!({"pool": {"name": "mistral-eu", "model": "mistral", "region": "eu-west", "engine": "VLLM",
            "min_replicas": 0, "max_replicas": 1,
            "scale_to_zero_idle_seconds": 60, "cold_start_timeout_seconds": 2}}),
    )
    .await
    .expect("create pool");
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    wait::until(
        "the edge to know the models",
        Duration::from_secs(20),
        || async {
            let models = mesh.edge_models(&edge).await;
            (models.contains(&"llama".to_string()) && models.contains(&"mistral".to_string()))
                .then_some(())
        },
    )
    .await;

    // No replica and no request: the workload is set to zero.
    let first = next_change(&mut kube).await;
    assert_eq!(
        first,
        ScaleChange {
            workload: "namespaces/gpu/deployments/llama".into(),
            replicas: 0
        }
    );

    // A request is held; the edge's demand brings the pool to one replica.
    let held = {
        let (http, url) = (mesh.http.clone(), url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = http
                .post_json(
                    &url,
                    &json!({"model": "llama", "max_tokens": 4,
                        "messages": [{"role": "user", "content": "wake up"}]}),
                )
                .await;
            (reply, started.elapsed())
        })
    };
    let change = next_change(&mut kube).await;
    assert_eq!(change.replicas, 1, "{change:?}");
    let decision = wait::until("the scale-up decision", Duration::from_secs(10), || async {
        scaling(&mesh.admin, "llama-eu").await.filter(|d| {
            d["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("scaling up from zero")
                && d["actuation"].is_string()
        })
    })
    .await;
    assert_eq!(decision["demand"], true, "{decision}");
    assert!(
        decision["actuation"]
            .as_str()
            .unwrap_or_default()
            .contains("Deployment gpu/llama set to 1"),
        "{decision}"
    );
    // The "kubelet" starts the pod.
    let mut replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let (reply, waited) = held.await.expect("task");
    let reply = reply.expect("held request answered");
    assert_eq!(reply.status, 200, "{}", reply.text());
    eprintln!("held request answered after {waited:?}");

    // Idle for 2 s: back to zero.
    let change = next_change(&mut kube).await;
    assert_eq!(change.replicas, 0, "{change:?}");
    wait::until("the idle decision", Duration::from_secs(10), || async {
        scaling(&mesh.admin, "llama-eu").await.filter(|d| {
            d["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("idle for")
                && count(d, "desiredReplicas") == 0
        })
    })
    .await;
    replica.sidecar.terminate().await;
    replica.engine.kill().await;
    assert_eq!(
        *kube.refused.lock().unwrap(),
        0,
        "every call carried the token"
    );

    // A pool that does not come back within its cold-start timeout: 503.
    let started = Instant::now();
    let reply = mesh
        .http
        .post_json(
            &url,
            &json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .expect("answered");
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    let error = reply.json();
    assert_eq!(error["error"]["code"], "cold_start_timeout", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("mistral-eu"),
        "{error}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let demanded = wait::until(
        "the demand to be recorded",
        Duration::from_secs(10),
        || async {
            scaling(&mesh.admin, "mistral-eu")
                .await
                .filter(|s| count(s, "desiredReplicas") == 1)
        },
    )
    .await;
    assert_eq!(demanded["demand"], true, "{demanded}");
}
