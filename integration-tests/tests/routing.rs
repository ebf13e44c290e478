//! Region spillover and model fallbacks through real edges: a region with
//! no replica of a model forwards to the next region's edge in its failover
//! order (and says so), a forwarded request is never forwarded again, and a
//! model with no replica reachable is served by its fallback (and says so).
//! Edges reach each other over mutual TLS on their mesh listeners. The
//! policies keep conversations and sessions on one replica, and the admin
//! API's ExplainRoute, asked through grpcurl, names the replica an edge
//! would choose and why, without sending or recording anything.

use std::time::Duration;

use infermesh_integration_tests::client::{Http, Reply};
use infermesh_integration_tests::mesh::{Edge, Mesh};
use infermesh_integration_tests::wait;
use infermesh_runtime::tls::mesh::{MeshClientTls, expected_authority};
use infermesh_runtime::tls::{PeerIdentity, PeerRole};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

/// Sets `region`'s failover order and edge address through UpdateRegion.
async fn set_region(mesh: &Mesh, region: &str, failover: &[&str], edge: &Edge) {
    let current = mesh
        .admin("GetRegion", json!({"name": region}))
        .await
        .expect("region exists");
    let mut updated = current.clone();
    updated["failover"] = json!(failover);
    updated["edgeAddress"] = json!(edge.mesh_address);
    mesh.admin("UpdateRegion", json!({"region": updated}))
        .await
        .expect("update region");
}

async fn chat(mesh: &Mesh, edge: &Edge, model: &str) -> Reply {
    mesh.http
        .post_json(
            &format!("{}/v1/chat/completions", edge.url),
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await
        .expect("the edge answers")
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Requests for `model` an edge answered, from its metrics.
async fn answered(mesh: &Mesh, edge: &Edge, model: &str) -> f64 {
    let text = mesh.http.get(&edge.metrics_url).await.unwrap().text();
    text.lines()
        .filter(|l| {
            l.starts_with("infermesh_edge_requests_total")
                && l.contains(&format!("model=\"{model}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_region_without_replicas_spills_over_once_and_falls_back_by_policy() {
    let mesh = Mesh::start().await;
    mesh.admin(
        "CreateRegion",
        json!({"region": {"name": "eu-west", "zones": ["eu-west-a"]}}),
    )
    .await
    .unwrap();
    // llama: replicas only in us-east. orphan: a pool in us-east, no replica.
    mesh.register("us-east", "llama", "llama-us").await;
    mesh.register("us-east", "orphan", "orphan-us").await;
    // big: a pool in eu-west without replicas, falling back to small (served in eu-west).
    mesh.register("eu-west", "small", "small-eu").await;
    let big = json!({"model": {"name": "big", "fallbacks": ["small"]}});
    mesh.admin("CreateModel", big).await.unwrap();
    mesh.register("eu-west", "big", "big-eu").await;
    let _llama = mesh
        .start_replica("llama-us-0", "llama-us", "llama", "us-east", &[])
        .await;
    let _small = mesh
        .start_replica("small-eu-0", "small-eu", "small", "eu-west", &[])
        .await;
    let eu = mesh.start_edge("eu-west", &[]).await;
    let us = mesh.start_edge("us-east", &[]).await;
    set_region(&mesh, "eu-west", &["us-east"], &eu).await;
    set_region(&mesh, "us-east", &["eu-west"], &us).await;

    // llama through the eu-west edge is served by us-east's.
    let reply = wait::until(
        "eu-west to spill llama over to us-east",
        DEADLINE,
        || async {
            let reply = chat(&mesh, &eu, "llama").await;
            (reply.status == 200).then_some(reply)
        },
    )
    .await;
    assert_eq!(header(&reply, "x-infermesh-spillover"), Some("us-east"));
    assert_eq!(reply.json()["model"], "llama");

    // The spillover went over mutual TLS to us-east's mesh listener, which
    // takes no plaintext and no identity but an edge's.
    let plaintext = Http::new()
        .get(&format!("http://{}/v1/models", us.mesh_address))
        .await;
    assert!(plaintext.is_err(), "{:?}", plaintext.map(|r| r.status));
    let sidecar = mesh.pki.sidecar("us-east", "llama-us", "llama-us-0");
    let as_sidecar = MeshClientTls::new(
        &mesh.pki.ca_cert,
        &sidecar.cert,
        &sidecar.key,
        Duration::from_secs(2),
        CancellationToken::new(),
    )
    .unwrap();
    let us_edge = PeerIdentity::new(PeerRole::Edge, "us-east").unwrap();
    let mesh_url = format!(
        "https://{}/v1/chat/completions",
        expected_authority(&us_edge, &us.mesh_address)
    );
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    let refused = Http::with_key(&mesh.api_key)
        .with_identity(&as_sidecar)
        .post_json(&mesh_url, &body)
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "edge_identity_required");
    let served = mesh.http.post_json(&mesh_url, &body).await.unwrap();
    assert_eq!(
        served.status,
        200,
        "an edge identity is served: {}",
        served.text()
    );

    // Nobody serves orphan: eu-west forwards once, us-east does not forward back.
    let before = answered(&mesh, &us, "orphan").await;
    let reply = chat(&mesh, &eu, "orphan").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "no_healthy_replica");
    assert_eq!(
        answered(&mesh, &us, "orphan").await,
        before + 1.0,
        "exactly one hop"
    );

    // big has no replica anywhere: its fallback answers, and says so.
    let reply = chat(&mesh, &eu, "big").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(header(&reply, "x-infermesh-fallback"), Some("small"));
    let body: Value = reply.json();
    assert_eq!(body["model"], "small");
}

/// Model `chat` (with `fields` such as its routing policy) served by three
/// replicas in eu-west behind one edge; returns them once the edge routes to all.
async fn three_replicas(
    mesh: &Mesh,
    fields: Value,
) -> (Vec<infermesh_integration_tests::mesh::Replica>, Edge) {
    let mut model = json!({"name": "chat"});
    if let (Some(model), Some(fields)) = (model.as_object_mut(), fields.as_object()) {
        model.extend(fields.clone());
    }
    mesh.admin("CreateModel", json!({"model": model}))
        .await
        .unwrap();
    mesh.register("eu-west", "chat", "chat-eu").await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(
            mesh.start_replica(&format!("chat-{i}"), "chat-eu", "chat", "eu-west", &[])
                .await,
        );
    }
    let edge = mesh.start_edge("eu-west", &[]).await;
    wait::until("all three replicas routable", DEADLINE, || async {
        (mesh.endpoint_ids("chat-eu").await.len() == 3).then_some(())
    })
    .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let warm = json!({"model": "chat", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1});
    mesh.wait_until_served(&url, &warm).await;
    (replicas, edge)
}

/// Requests each replica's engine has finished.
async fn finished(
    mesh: &Mesh,
    replicas: &[infermesh_integration_tests::mesh::Replica],
) -> Vec<f64> {
    let mut counts = Vec::new();
    for replica in replicas {
        let text = mesh
            .http
            .get(&format!("{}/metrics", replica.engine_url))
            .await
            .unwrap()
            .text();
        counts.push(
            text.lines()
                .filter(|l| l.starts_with("vllm:request_success_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        );
    }
    counts
}

#[tokio::test]
async fn prefix_affinity_keeps_a_conversation_on_the_replica_holding_its_prefix() {
    let mesh = Mesh::start().await;
    let (replicas, edge) =
        three_replicas(&mesh, json!({"routing_policy": "PREFIX_AFFINITY"})).await;
    let url = format!("{}/v1/chat/completions", edge.url);

    let system =
        "You are the infermesh support assistant. Answer briefly and cite the docs. ".repeat(12);
    let mut messages = vec![json!({"role": "system", "content": system})];
    let before = finished(&mesh, &replicas).await;
    for turn in 0..4 {
        messages.push(json!({"role": "user", "content": format!("question number {turn} about routing tables")}));
        let reply = mesh
            .http
            .post_json(
                &url,
                &json!({"model": "chat", "messages": messages, "max_tokens": 4}),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer = reply.json()["choices"][0]["message"]["content"].clone();
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    let after = finished(&mesh, &replicas).await;
    let served: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        served.contains(&4.0) && served.iter().filter(|&&n| n > 0.0).count() == 1,
        "every turn on one replica: {served:?}"
    );
}

#[tokio::test]
async fn sessions_stick_to_a_replica_and_receipts_say_how_each_answer_was_routed() {
    let mesh = Mesh::start().await;
    let fields = json!({"routing_policy": "SESSION_AFFINITY", "route_receipts": true});
    let (_replicas, edge) = three_replicas(&mesh, fields).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let ask = |user: &str| {
        json!({"model": "chat", "user": user, "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]})
    };

    let endpoint_of = |reply: &Reply| -> String {
        let receipt = header(reply, "x-infermesh-route")
            .expect("a route receipt")
            .to_string();
        assert!(receipt.contains("policy=session_affinity"), "{receipt}");
        assert!(receipt.contains("region=eu-west"), "{receipt}");
        assert!(
            !receipt.contains("chat-")
                && !receipt.contains("127.0.0.1")
                && !receipt.contains("reason"),
            "no pod name, address or routing reason: {receipt}"
        );
        receipt
            .split("; ")
            .find_map(|p| p.strip_prefix("replica="))
            .expect("replica in the receipt")
            .to_string()
    };
    let mut alice = Vec::new();
    for _ in 0..5 {
        let reply = mesh.http.post_json(&url, &ask("alice")).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            header(&reply, "x-infermesh-load").is_none(),
            "the sidecar's load stamp stays inside the mesh"
        );
        alice.push(endpoint_of(&reply));
    }
    assert!(alice.iter().all(|e| *e == alice[0]), "{alice:?}");
    let mut owners = std::collections::HashSet::new();
    for i in 0..24 {
        let reply = mesh
            .http
            .post_json(&url, &ask(&format!("user-{i}")))
            .await
            .unwrap();
        owners.insert(endpoint_of(&reply));
    }
    assert_eq!(
        owners.len(),
        3,
        "sessions spread over the replicas: {owners:?}"
    );
}

#[tokio::test]
async fn explain_route_names_the_replica_holding_a_conversation_and_why() {
    let mesh = Mesh::start().await;
    let (replicas, edge) =
        three_replicas(&mesh, json!({"routing_policy": "PREFIX_AFFINITY"})).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let system = "You are a careful assistant for the routing team; keep answers short. ".repeat(8);
    let body = json!({"model": "chat", "max_tokens": 2, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "which replica holds this conversation?"}]});
    let before = finished(&mesh, &replicas).await;
    let reply = mesh.http.post_json(&url, &body).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let after = finished(&mesh, &replicas).await;
    let served = after
        .iter()
        .zip(&before)
        .position(|(a, b)| a > b)
        .expect("one replica served it");
    let holder = format!("chat-{served}");

    // One grpcurl line: the same body, as a client sent it.
    let explained = mesh
        .admin(
            "ExplainRoute",
            json!({"region": "eu-west", "body": body.to_string()}),
        )
        .await
        .expect("explain");
    assert_eq!(explained["chosen"], holder.as_str(), "{explained}");
    assert_eq!(explained["policy"], "prefix_affinity");
    assert_eq!(explained["model"], "chat");
    assert!(
        explained["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("prefix match")),
        "{explained}"
    );
    assert!(explained["edge"].as_str().is_some_and(|e| !e.is_empty()));
    let candidates = explained["candidates"].as_array().expect("candidates");
    assert_eq!(candidates.len(), 3, "{explained}");
    let blocks = |id: &str| {
        candidates
            .iter()
            .find(|c| c["endpoint"] == id)
            .and_then(|c| c["prefixBlocks"].as_u64())
            .unwrap_or(0)
    };
    assert!(blocks(&holder) > 0, "{explained}");
    assert_eq!(
        explained["promptBlocks"].as_u64(),
        Some(blocks(&holder)),
        "the holder has the whole prompt: {explained}"
    );
    let holder_entry = candidates.iter().find(|c| c["endpoint"] == holder.as_str());
    let holder_entry = holder_entry.expect("the holder is a candidate");
    assert!(
        holder_entry["load"].is_object() && holder_entry["loadAgeMs"] != "-1",
        "the holder's sidecar stamped its load on the answer: {holder_entry}"
    );

    // Explaining sent nothing and recorded nothing: a new prompt is not held.
    let unchanged = finished(&mesh, &replicas).await;
    assert_eq!(unchanged, after, "nothing was sent to an engine");
    let fresh = json!({"region": "eu-west", "model": "chat",
        "prompt": "an entirely new prompt that no replica has seen, long enough for two blocks of it"});
    let first = mesh.admin("ExplainRoute", fresh.clone()).await.unwrap();
    assert!(
        first["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("no prefix match")),
        "{first}"
    );
    let second = mesh.admin("ExplainRoute", fresh).await.unwrap();
    assert!(
        second["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("no prefix match")),
        "explaining recorded no prefix: {second}"
    );

    // Bad questions are refused by name; only an admin may ask.
    for (request, code, starts) in [
        (json!({"region": "eu-west"}), "InvalidArgument", "model:"),
        (
            json!({"region": "eu-west", "model": "nope"}),
            "NotFound",
            "model",
        ),
        (
            json!({"region": "mars", "model": "chat"}),
            "NotFound",
            "region",
        ),
        (
            json!({"region": "eu-west", "body": "[1]"}),
            "InvalidArgument",
            "body:",
        ),
        (
            json!({"region": "eu-west", "model": "chat", "edge": "no-such-edge"}),
            "FailedPrecondition",
            "edge",
        ),
    ] {
        let refused = mesh
            .admin("ExplainRoute", request.clone())
            .await
            .unwrap_err();
        assert_eq!(refused.code, code, "{request}: {refused:?}");
        assert!(
            refused.message.starts_with(starts),
            "{request}: {refused:?}"
        );
    }
    let not_admin = mesh
        .admin
        .with_identity(mesh.pki.sidecar("eu-west", "chat-eu", "chat-0"))
        .raw(
            &[
                "-d",
                &json!({"region": "eu-west", "model": "chat"}).to_string(),
            ],
            &["infermesh.v1.AdminService/ExplainRoute"],
        )
        .await
        .unwrap_err();
    assert_eq!(not_admin.code, "PermissionDenied", "{not_admin:?}");
    let described = mesh
        .admin
        .raw(&[], &["describe", "infermesh.v1.AdminService.ExplainRoute"])
        .await
        .expect("describe");
    assert!(described.contains("RouteExplanation"), "{described}");
}
