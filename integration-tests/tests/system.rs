//! Whole-system scenarios: real etcd, the real control plane, edge and
//! sidecar binaries, simulated engines, and the admin API through the real
//! grpcurl. Each test starts its own mesh on free ports.

use std::time::{Duration, Instant};

use infermesh_integration_tests::mesh::{Edge, LEASE_TTL_SECONDS, Mesh};
use infermesh_integration_tests::wait;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(20);

fn chat(model: &str, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the mesh"}],
        "max_tokens": 8,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Waits until a chat completion for `model` through `edge` succeeds.
async fn until_routable(mesh: &Mesh, edge: &Edge, model: &str) {
    let url = format!("{}/v1/chat/completions", edge.url);
    wait::until(&format!("{model} to be routable"), DEADLINE, || {
        let http = mesh.http.clone();
        let url = url.clone();
        let body = chat(model, false);
        async move { (http.post_json(&url, &body).await.ok()?.status == 200).then_some(()) }
    })
    .await;
}

/// Waits until the registered endpoints of `pool` are exactly `ids`.
async fn until_endpoints(mesh: &Mesh, pool: &str, ids: &[&str]) {
    let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    wait::until(
        &format!("endpoints of {pool} to be {ids:?}"),
        DEADLINE,
        || {
            let want = want.clone();
            async move { (mesh.endpoint_ids(pool).await == want).then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn model_and_pool_created_with_grpcurl_appear_in_the_edge_model_list() {
    let mesh = Mesh::start().await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    wait::until("edge to hold a table", DEADLINE, || {
        let http = mesh.http.clone();
        let url = format!("{}/readyz", edge.url);
        async move { (http.get(&url).await.ok()?.status == 200).then_some(()) }
    })
    .await;
    assert!(
        mesh.edge_models(&edge).await.is_empty(),
        "nothing registered yet"
    );

    mesh.register("eu-west", "meta-llama/Llama-3.1-8B-Instruct", "llama-eu")
        .await;
    let listed = listed_once(&mesh, &edge, "meta-llama/Llama-3.1-8B-Instruct").await;
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"][0]["object"], "model");

    // An alias is listed too, as a name clients may send, rooted in its model.
    let model = mesh
        .admin(
            "GetModel",
            json!({"name": "meta-llama/Llama-3.1-8B-Instruct"}),
        )
        .await
        .unwrap();
    let mut update = model.clone();
    update["aliases"] = json!(["llama-8b"]);
    mesh.admin("UpdateModel", json!({"model": update}))
        .await
        .unwrap();
    let listed = listed_once(&mesh, &edge, "llama-8b").await;
    let alias = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "llama-8b")
        .cloned()
        .unwrap();
    assert_eq!(
        alias["root"], "meta-llama/Llama-3.1-8B-Instruct",
        "{listed}"
    );
}

/// The edge's `/v1/models` once it lists `name`.
async fn listed_once(mesh: &Mesh, edge: &Edge, name: &str) -> serde_json::Value {
    wait::until(
        &format!("{name} to be listed by the edge"),
        DEADLINE,
        || async {
            let listed = mesh
                .http
                .get(&format!("{}/v1/models", edge.url))
                .await
                .ok()?
                .json();
            let ids = listed["data"].as_array()?;
            ids.iter().any(|m| m["id"] == name).then_some(listed)
        },
    )
    .await
}

#[tokio::test]
async fn chat_completion_streams_and_not_through_edge_sidecar_and_engine() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _r1 = mesh
        .start_replica(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &["--decode-ms-per-token", "30"],
        )
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    until_routable(&mesh, &edge, "llama").await;
    let url = format!("{}/v1/chat/completions", edge.url);

    let reply = mesh
        .http
        .post_json(&url, &chat("llama", false))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.headers.contains_key("x-request-id"));
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "llama");
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    let streamed = mesh
        .http
        .post_stream(&url, &chat("llama", true))
        .await
        .unwrap();
    assert_eq!(streamed.status, 200);
    let content_type = streamed.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let events = streamed.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let usage: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| !c["usage"].is_null())
        .collect();
    assert_eq!(usage.len(), 1, "usage arrives once, in the final chunk");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 8);
    // Chunks arrive as the engine decodes them (30 ms a token), not in one
    // buffered block at the end.
    assert!(
        streamed.frames.len() >= 4,
        "only {} frames",
        streamed.frames.len()
    );
    let first = streamed.frames.first().unwrap().0;
    let last = streamed.frames.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(150),
        "frames arrived within {:?}: the stream was buffered",
        last - first
    );
}

#[tokio::test]
async fn a_killed_sidecar_leaves_the_table_and_the_edge_stops_sending_to_it() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let mut r1 = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let _r2 = mesh
        .start_replica("llama-1", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    until_endpoints(&mesh, "llama-eu", &["llama-0", "llama-1"]).await;
    until_routable(&mesh, &edge, "llama").await;

    let killed_at = Instant::now();
    r1.sidecar.kill().await;
    until_endpoints(&mesh, "llama-eu", &["llama-1"]).await;
    assert!(
        killed_at.elapsed() <= Duration::from_secs(u64::from(LEASE_TTL_SECONDS) + 3),
        "endpoint left after {:?}",
        killed_at.elapsed()
    );

    // Once the edge applies the table, every request lands on the live replica.
    let url = format!("{}/v1/chat/completions", edge.url);
    wait::until(
        "the edge to stop choosing the dead replica",
        DEADLINE,
        || {
            let http = mesh.http.clone();
            let url = url.clone();
            async move {
                for _ in 0..10 {
                    if http
                        .post_json(&url, &chat("llama", false))
                        .await
                        .ok()?
                        .status
                        != 200
                    {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    for _ in 0..20 {
        let reply = mesh
            .http
            .post_json(&url, &chat("llama", false))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

#[tokio::test]
async fn stale_and_invalid_admin_writes_are_refused_with_precise_codes() {
    let mesh = Mesh::start().await;
    mesh.admin("CreateRegion", json!({"region": {"name": "eu-west"}}))
        .await
        .unwrap();
    let model = mesh
        .admin(
            "CreateModel",
            json!({"model": {"name": "llama", "aliases": ["l3"]}}),
        )
        .await
        .unwrap();
    let first_revision = model["revision"].as_str().unwrap().to_string();

    let updated = mesh
        .admin(
            "UpdateModel",
            json!({"model": {"name": "llama", "aliases": ["l3"], "description": "v2", "revision": first_revision}}),
        )
        .await
        .unwrap();
    assert_ne!(updated["revision"].as_str().unwrap(), first_revision);

    let stale = mesh
        .admin(
            "UpdateModel",
            json!({"model": {"name": "llama", "description": "v3", "revision": first_revision}}),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, "FailedPrecondition", "{stale:?}");
    assert!(
        stale
            .message
            .contains(updated["revision"].as_str().unwrap()),
        "names the current revision: {stale:?}"
    );
    let kept = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .unwrap();
    assert_eq!(kept["description"], "v2", "the stale write changed nothing");

    let invalid = mesh
        .admin(
            "CreatePool",
            json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west", "engine": "VLLM", "max_replicas": 0}}),
        )
        .await
        .unwrap_err();
    assert_eq!(invalid.code, "InvalidArgument");
    assert!(
        invalid.message.starts_with("pool.max_replicas"),
        "{invalid:?}"
    );

    let bad_name = mesh
        .admin("CreateModel", json!({"model": {"name": "has space"}}))
        .await
        .unwrap_err();
    assert_eq!(bad_name.code, "InvalidArgument");
    assert!(bad_name.message.starts_with("model.name"), "{bad_name:?}");

    let missing_ref = mesh
        .admin(
            "CreatePool",
            json!({"pool": {"name": "ghost", "model": "nope", "region": "eu-west", "engine": "VLLM", "max_replicas": 1}}),
        )
        .await
        .unwrap_err();
    assert_eq!(missing_ref.code, "FailedPrecondition");
    assert!(
        missing_ref.message.contains("pool.model"),
        "{missing_ref:?}"
    );
    let absent = mesh
        .admin("GetPool", json!({"name": "ghost"}))
        .await
        .unwrap_err();
    assert_eq!(
        absent.code, "NotFound",
        "a refused create leaves nothing behind"
    );

    let taken = mesh
        .admin(
            "CreateModel",
            json!({"model": {"name": "other", "aliases": ["l3"]}}),
        )
        .await
        .unwrap_err();
    assert_eq!(taken.code, "AlreadyExists");
    assert!(taken.message.contains("l3"), "{taken:?}");

    mesh.admin(
        "CreatePool",
        json!({"pool": {"name": "llama-eu", "model": "llama", "region": "eu-west", "engine": "VLLM", "max_replicas": 2}}),
    )
    .await
    .unwrap();
    let in_use = mesh
        .admin("DeleteModel", json!({"name": "llama"}))
        .await
        .unwrap_err();
    assert_eq!(in_use.code, "FailedPrecondition");
    assert!(
        in_use.message.contains("llama-eu"),
        "names the pool: {in_use:?}"
    );
    let region_in_use = mesh
        .admin("DeleteRegion", json!({"name": "eu-west"}))
        .await
        .unwrap_err();
    assert_eq!(region_in_use.code, "FailedPrecondition");

    let no_revision = mesh
        .admin(
            "UpdateRegion",
            json!({"region": {"name": "eu-west", "zones": ["eu-west-1a"]}}),
        )
        .await
        .unwrap_err();
    assert_eq!(no_revision.code, "InvalidArgument");
    assert!(
        no_revision.message.starts_with("region.revision"),
        "{no_revision:?}"
    );

    let missing = mesh
        .admin("GetModel", json!({"name": "nope"}))
        .await
        .unwrap_err();
    assert_eq!(missing.code, "NotFound");
    let bad_table = mesh
        .admin("GetRoutingTable", json!({"region": "eu-west"}))
        .await
        .unwrap_err();
    assert_eq!(bad_table.code, "InvalidArgument");
    assert!(bad_table.message.contains("role"), "{bad_table:?}");
}

#[tokio::test]
async fn a_partial_update_keeps_what_it_leaves_out_and_clears_only_what_its_mask_names() {
    let mesh = Mesh::start().await;
    let created = mesh
        .admin(
            "CreateModel",
            json!({"model": {"name": "llama", "aliases": ["l3"], "fallbacks": ["small"],
                   "cache_policy": {"enabled": true, "ttl_seconds": 600}}}),
        )
        .await
        .unwrap();

    // Only a description and no mask: every other field stays.
    let described = mesh
        .admin(
            "UpdateModel",
            json!({"model": {"name": "llama", "description": "v2", "revision": created["revision"]}}),
        )
        .await
        .unwrap();
    assert_eq!(described["description"], "v2", "{described}");
    assert_eq!(described["aliases"], json!(["l3"]), "{described}");
    assert_eq!(described["fallbacks"], json!(["small"]), "{described}");
    assert_eq!(
        described["cachePolicy"],
        json!({"enabled": true, "ttlSeconds": 600}),
        "{described}"
    );

    // A mask naming fallbacks, and none sent: they are cleared, nothing else.
    let cleared = mesh
        .admin(
            "UpdateModel",
            json!({"model": {"name": "llama", "revision": described["revision"]},
                   "update_mask": {"paths": ["fallbacks"]}}),
        )
        .await
        .unwrap();
    assert!(cleared.get("fallbacks").is_none(), "{cleared}");
    assert_eq!(cleared["description"], "v2", "{cleared}");
    assert_eq!(cleared["aliases"], json!(["l3"]), "{cleared}");

    // A path into the cache policy changes that one field of it.
    let shorter = mesh
        .admin(
            "UpdateModel",
            json!({"model": {"name": "llama", "cache_policy": {"ttl_seconds": 60},
                             "revision": cleared["revision"]},
                   "update_mask": {"paths": ["cache_policy.ttl_seconds"]}}),
        )
        .await
        .unwrap();
    assert_eq!(
        shorter["cachePolicy"],
        json!({"enabled": true, "ttlSeconds": 60}),
        "{shorter}"
    );

    // A path that is not a field, or one an update may not set, is refused
    // by name and writes nothing.
    for (path, says) in [
        ("fallback", "\"fallback\" is not a field of model"),
        ("name", "\"name\" cannot be changed"),
        ("revision", "\"revision\" is set by the server"),
    ] {
        let refused = mesh
            .admin(
                "UpdateModel",
                json!({"model": {"name": "llama", "description": "v3", "revision": shorter["revision"]},
                       "update_mask": {"paths": ["description", path]}}),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code, "InvalidArgument", "{refused:?}");
        assert!(
            refused.message.starts_with("update_mask: ") && refused.message.contains(says),
            "{refused:?}"
        );
    }
    let kept = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .unwrap();
    assert_eq!(kept, shorter, "a refused update changed the model");
}

#[tokio::test]
async fn after_a_control_plane_restart_edges_and_sidecars_reconnect_and_converge() {
    let mut mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _r1 = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    until_routable(&mesh, &edge, "llama").await;

    mesh.kill_control_plane().await;
    let reply = mesh
        .http
        .post_json(
            &format!("{}/v1/chat/completions", edge.url),
            &chat("llama", false),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.status, 200,
        "the edge keeps serving from its last table"
    );

    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    mesh.start_control_plane().await;

    // The sidecar re-registered: the new control plane has a load report from it.
    wait::until(
        "the sidecar to report to the new control plane",
        DEADLINE,
        || async {
            let listed = mesh
                .admin("ListEndpoints", json!({"pool": "llama-eu"}))
                .await
                .ok()?;
            let observed = listed["endpoints"][0]["load"]["observedAtUnixMs"]
                .as_str()?
                .parse::<i64>()
                .ok()?;
            (observed >= restarted_ms).then_some(())
        },
    )
    .await;

    // The edge re-subscribed: a change made now reaches it.
    mesh.register("eu-west", "qwen", "qwen-eu").await;
    wait::until("the edge to receive the new model", DEADLINE, || async {
        mesh.edge_models(&edge)
            .await
            .contains(&"qwen".to_string())
            .then_some(())
    })
    .await;
    // And the endpoint outlived the old control plane's lease: still routable.
    until_endpoints(&mesh, "llama-eu", &["llama-0"]).await;
    until_routable(&mesh, &edge, "llama").await;
}
