//! LoRA adapters through real processes: the registry's adapter objects
//! and their refusals, a cold fleet loading an adapter once for concurrent
//! first requests, later requests staying on the holder, eviction under
//! the sidecar's resident limit, private adapters, unknown adapters, and a
//! load failure retried on exactly one other replica.

use std::time::Duration;

use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::mesh::{Edge, Mesh, Replica};
use infermesh_integration_tests::{scrape, wait};
use serde_json::{Value, json};

const LORA: &[&str] = &["--enable-lora", "--lora-load-ms", "300"];

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
}

/// An engine counter of the simulator, 0 when absent.
async fn engine_counter(mesh: &Mesh, replica: &Replica, name: &str) -> f64 {
    let text = mesh
        .http
        .get(&format!("{}/metrics", replica.engine_url))
        .await
        .expect("engine metrics")
        .text();
    scrape::value(&text, name, &[]).unwrap_or(0.0)
}

async fn total(mesh: &Mesh, replicas: &[Replica], name: &str) -> f64 {
    let mut sum = 0.0;
    for replica in replicas {
        sum += engine_counter(mesh, replica, name).await;
    }
    sum
}

/// The adapters `replica`'s engine has loaded, by `/v1/models`.
async fn loaded(mesh: &Mesh, replica: &Replica) -> Vec<String> {
    let models = mesh
        .http
        .get(&format!("{}/v1/models", replica.engine_url))
        .await
        .expect("engine models")
        .json();
    models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|m| m["parent"].is_string())
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn create_adapter(mesh: &Mesh, name: &str, base: &str, extra: Value) -> Value {
    let mut adapter = json!({"name": name, "base_model": base, "source": format!("/adapters/{name}"), "version": "r1"});
    if let (Some(a), Some(extra)) = (adapter.as_object_mut(), extra.as_object()) {
        a.extend(extra.clone());
    }
    mesh.admin("CreateAdapter", json!({"adapter": adapter}))
        .await
        .expect("CreateAdapter")
}

/// Waits until the sidecars of `replicas` acknowledged a table at least as
/// new as `revision` (the adapter's, written in etcd), so they know it.
async fn until_sidecars_know(mesh: &Mesh, replicas: &[&Replica], revision: &Value) {
    let number = |v: &Value| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };
    let revision = number(revision);
    wait::until("the sidecars' tables", Duration::from_secs(20), || async {
        let listed = mesh.admin("ListSubscribers", json!({})).await.ok()?;
        let subscribers = listed["subscribers"].as_array()?.clone();
        replicas
            .iter()
            .all(|r| {
                subscribers
                    .iter()
                    .any(|s| s["nodeId"] == r.id.as_str() && number(&s["ackedVersion"]) >= revision)
            })
            .then_some(())
    })
    .await;
}

/// Waits until the edge lists `name` to the caller of `http`.
async fn until_listed(http: &Http, edge: &Edge, name: &str) {
    let url = format!("{}/v1/models", edge.url);
    wait::until("the adapter at the edge", Duration::from_secs(20), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let models = http.get(&url).await.ok()?.json();
            models["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == name)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn an_adapter_loads_once_for_a_cold_fleet_and_later_requests_stay_on_its_holder() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(
            mesh.start_replica(&format!("llama-{i}"), "llama-eu", "llama", "eu-west", LORA)
                .await,
        );
    }
    let edge = mesh.start_edge("eu-west", &[]).await;

    // The registry refuses what it cannot serve, naming the field.
    let refusals = [
        (
            json!({"name": "bot", "base_model": "nope", "source": "/a"}),
            "FailedPrecondition",
            "adapter.base_model",
        ),
        (
            json!({"name": "llama", "base_model": "llama", "source": "/a"}),
            "InvalidArgument",
            "adapter.base_model",
        ),
        (
            json!({"name": "bot", "base_model": "llama", "source": ""}),
            "InvalidArgument",
            "adapter.source",
        ),
        (
            json!({"name": "bot", "base_model": "llama", "source": "/a", "version": "r 1"}),
            "InvalidArgument",
            "adapter.version",
        ),
        (
            json!({"name": "bot", "base_model": "llama", "source": "/a", "owner_tenant": "ghost"}),
            "FailedPrecondition",
            "adapter.owner_tenant",
        ),
    ];
    for (adapter, code, field) in refusals {
        let refused = mesh
            .admin("CreateAdapter", json!({"adapter": adapter}))
            .await
            .unwrap_err();
        assert_eq!(refused.code, code, "{adapter}: {}", refused.message);
        assert!(refused.message.contains(field), "{}", refused.message);
    }
    let clash = mesh
        .admin(
            "CreateAdapter",
            json!({"adapter": {"name": "llama-alias-free", "base_model": "llama", "source": "/a"}}),
        )
        .await
        .expect("a free name");
    let taken = mesh
        .admin(
            "CreateModel",
            json!({"model": {"name": "llama-alias-free"}}),
        )
        .await
        .unwrap_err();
    assert_eq!(taken.code, "AlreadyExists");
    assert!(taken.message.contains("adapter"), "{}", taken.message);
    mesh.admin(
        "DeleteAdapter",
        json!({"name": "llama-alias-free", "revision": clash["revision"]}),
    )
    .await
    .expect("DeleteAdapter");

    let bot = create_adapter(&mesh, "support-bot", "llama", json!({})).await;
    let stale = mesh
        .admin(
            "UpdateAdapter",
            json!({"adapter": {"name": "support-bot", "description": "x", "revision": 1},
                "update_mask": {"paths": ["description"]}}),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, "FailedPrecondition", "{}", stale.message);
    // A model with adapters on it is not deleted.
    mesh.admin("CreateModel", json!({"model": {"name": "spare"}}))
        .await
        .expect("CreateModel");
    create_adapter(&mesh, "spare-bot", "spare", json!({})).await;
    let in_use = mesh
        .admin("DeleteModel", json!({"name": "spare"}))
        .await
        .unwrap_err();
    assert_eq!(in_use.code, "FailedPrecondition");
    assert!(in_use.message.contains("spare-bot"), "{}", in_use.message);
    let listed = mesh
        .admin("ListAdapters", json!({"base_model": "llama"}))
        .await
        .expect("ListAdapters");
    assert_eq!(listed["adapters"][0]["revision"], bot["revision"]);

    until_listed(&mesh.http, &edge, "support-bot").await;
    until_sidecars_know(
        &mesh,
        &replicas.iter().collect::<Vec<_>>(),
        &bot["revision"],
    )
    .await;
    let models = mesh
        .http
        .get(&format!("{}/v1/models", edge.url))
        .await
        .unwrap()
        .json();
    let entry = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "support-bot")
        .unwrap()
        .clone();
    assert_eq!(entry["parent"], "llama");

    // Eight first requests at once: one load, every one served by the adapter.
    let url = format!("{}/v1/chat/completions", edge.url);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (http, url) = (mesh.http.clone(), url.clone());
            tokio::spawn(async move { http.post_json(&url, &chat("support-bot")).await })
        })
        .collect();
    for call in calls {
        let reply = call.await.unwrap().expect("answer");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["model"], "support-bot");
    }
    assert_eq!(total(&mesh, &replicas, "sim:lora_loads_total").await, 1.0);
    let holder = {
        let mut holder = None;
        for replica in &replicas {
            if !loaded(&mesh, replica).await.is_empty() {
                holder = Some(replica.id.clone());
            }
        }
        holder.expect("a replica holds the adapter")
    };

    // Later requests stay on the holder: no other load.
    for _ in 0..10 {
        let reply = mesh
            .http
            .post_json(&url, &chat("support-bot"))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(total(&mesh, &replicas, "sim:lora_loads_total").await, 1.0);
    let text = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    let resident = scrape::value(
        &text,
        "infermesh_edge_adapter_requests_total",
        &[("adapter", "support-bot"), ("placement", "resident")],
    )
    .unwrap_or(0.0);
    assert!(
        resident >= 10.0,
        "resident placements: {resident}, holder {holder}"
    );

    // An unknown adapter is an unknown model.
    let unknown = mesh
        .http
        .post_json(&url, &chat("no-such-bot"))
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");

    // Nobody but the sidecar loads adapters, whatever path it asks.
    let direct = mesh
        .http
        .clone()
        .with_identity(&mesh.edge_tls)
        .post_json(
            &format!("{}/v1/load_lora_adapter", replicas[0].sidecar_url),
            &json!({"lora_name": "evil", "lora_path": "/etc"}),
        )
        .await
        .unwrap();
    assert_eq!(direct.status, 403, "{}", direct.text());
}

#[tokio::test]
async fn resident_limits_private_adapters_and_load_failures() {
    let mut mesh = Mesh::start().await;
    mesh.env.push(("INFERMESH_MAX_ADAPTERS".into(), "2".into()));
    mesh.register("eu-west", "llama", "llama-eu").await;
    let only = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", LORA)
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let mut last = Value::Null;
    for name in ["a-bot", "b-bot", "c-bot"] {
        last = create_adapter(&mesh, name, "llama", json!({})).await;
    }
    until_listed(&mesh.http, &edge, "c-bot").await;
    until_sidecars_know(&mesh, &[&only], &last["revision"]).await;

    // Two may be resident: loading a third unloads the least recently used.
    for name in ["a-bot", "b-bot", "a-bot", "c-bot"] {
        let reply = mesh.http.post_json(&url, &chat(name)).await.unwrap();
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
    }
    let mut held = loaded(&mesh, &only).await;
    held.sort();
    assert_eq!(held, ["a-bot", "c-bot"], "b-bot was least recently used");

    // A private adapter: its tenant's keys see and use it; others do not.
    mesh.admin("CreateTenant", json!({"tenant": {"name": "acme"}}))
        .await
        .expect("CreateTenant");
    let private = create_adapter(&mesh, "acme-bot", "llama", json!({"owner_tenant": "acme"})).await;
    let acme = Http::with_key(&mesh.create_key("acme", json!({})).await);
    until_listed(&acme, &edge, "acme-bot").await;
    until_sidecars_know(&mesh, &[&only], &private["revision"]).await;
    let served = acme.post_json(&url, &chat("acme-bot")).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text());
    let other = mesh.http.post_json(&url, &chat("acme-bot")).await.unwrap();
    assert_eq!(other.status, 404, "{}", other.text());
    let listed = mesh
        .http
        .get(&format!("{}/v1/models", edge.url))
        .await
        .unwrap()
        .json();
    assert!(
        !listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "acme-bot"),
        "{listed}"
    );

    // A second model: one replica fails every load, one does not.
    mesh.register("eu-west", "qwen", "qwen-eu").await;
    let failing_flags: Vec<&str> = LORA.iter().copied().chain(["--fail-lora-loads"]).collect();
    let qwen = [
        mesh.start_replica("qwen-0", "qwen-eu", "qwen", "eu-west", &failing_flags)
            .await,
        mesh.start_replica("qwen-1", "qwen-eu", "qwen", "eu-west", LORA)
            .await,
    ];
    create_adapter(&mesh, "warm-bot", "qwen", json!({})).await;
    create_adapter(&mesh, "new-bot", "qwen", json!({})).await;
    let broken = create_adapter(
        &mesh,
        "broken-bot",
        "qwen",
        json!({"source": "/adapters/missing/broken-bot"}),
    )
    .await;
    until_listed(&mesh.http, &edge, "broken-bot").await;
    until_sidecars_know(&mesh, &qwen.iter().collect::<Vec<_>>(), &broken["revision"]).await;
    mesh.wait_until_served(&url, &chat("qwen")).await;
    // Wherever it was placed first, warm-bot ends on the replica that loads.
    let warm = mesh.http.post_json(&url, &chat("warm-bot")).await.unwrap();
    assert_eq!(warm.status, 200, "{}", warm.text());
    assert_eq!(loaded(&mesh, &qwen[1]).await, ["warm-bot"]);
    // new-bot goes first to the replica holding fewer adapters, the
    // failing one, then once to the other, which serves it.
    let failures_before = total(&mesh, &qwen, "sim:lora_load_failures_total").await;
    let served = mesh.http.post_json(&url, &chat("new-bot")).await.unwrap();
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(
        total(&mesh, &qwen, "sim:lora_load_failures_total").await,
        failures_before + 1.0
    );
    // An adapter no replica can load: a clear 503, after exactly two tries.
    let failures_before = total(&mesh, &qwen, "sim:lora_load_failures_total").await;
    let refused = mesh
        .http
        .post_json(&url, &chat("broken-bot"))
        .await
        .unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(
        refused.json()["error"]["code"],
        "adapter_load_failed",
        "{}",
        refused.text()
    );
    assert!(refused.text().contains("broken-bot"), "{}", refused.text());
    assert!(refused.headers.get("x-infermesh-adapter-failed").is_none());
    assert_eq!(
        total(&mesh, &qwen, "sim:lora_load_failures_total").await,
        failures_before + 2.0,
        "tried on two replicas, no more"
    );
}
