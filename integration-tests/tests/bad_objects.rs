//! One bad object never freezes a table: objects the control plane would
//! refuse, written straight into etcd around it, are left out by every
//! edge while the rest of each push applies (a key revoked afterwards is
//! refused, a key created afterwards is accepted), and the edges' skip
//! gauge and `/readyz` say so. The admin API refuses the same addresses
//! with INVALID_ARGUMENT naming the field.

use std::time::{Duration, Instant};

use infermesh_integration_tests::client::Http;
use infermesh_integration_tests::mesh::{Edge, Mesh};
use infermesh_integration_tests::wait;
use infermesh_proto::v1::{Endpoint, EndpointState, Region};
use prost::Message;
use serde_json::json;

const PREFIX: &str = "/infermesh-test/";

async fn etcdctl(mesh: &Mesh, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    mesh.etcd.ctl(args, stdin).await
}

/// Writes `value` at `key` (relative to the test prefix), bypassing the control plane.
async fn put_raw(mesh: &Mesh, key: &str, value: &[u8]) {
    etcdctl(mesh, &["put", &format!("{PREFIX}{key}")], Some(value)).await;
}

/// The value of `name` with `labels` on an edge's metrics, if present.
async fn edge_metric(mesh: &Mesh, edge: &Edge, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = mesh.http.get(&edge.metrics_url).await.ok()?.text();
    infermesh_integration_tests::scrape::value(&text, name, labels)
}

async fn chat_status(http: &Http, edge: &Edge) -> u16 {
    let body =
        json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    match http
        .post_json(&format!("{}/v1/chat/completions", edge.url), &body)
        .await
    {
        Ok(reply) => reply.status,
        Err(_) => 0,
    }
}

#[tokio::test]
async fn objects_written_around_the_control_plane_are_skipped_and_later_changes_still_apply() {
    let mesh = Mesh::start().await;
    mesh.register("us-east", "llama", "llama-us").await;
    mesh.admin(
        "CreateRegion",
        json!({"region": {"name": "eu-west", "zones": ["eu-west-a"], "failover": ["us-east"]}}),
    )
    .await
    .expect("eu-west fails over to us-east");
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edges = [
        mesh.start_edge("eu-west", &[]).await,
        mesh.start_edge("eu-west", &[]).await,
    ];
    let first = mesh.create_key("acme", json!({})).await;
    let first_http = Http::with_key(&first);
    for edge in &edges {
        wait::until("first key served", Duration::from_secs(10), || async {
            (chat_status(&first_http, edge).await == 200).then_some(())
        })
        .await;
    }

    // An endpoint with a URL for an address, and us-east's edge address
    // with a scheme: both refused by the admin API, written here directly.
    let rogue = Endpoint {
        id: "rogue-0".into(),
        pool: "llama-eu".into(),
        model: "llama".into(),
        region: "eu-west".into(),
        address: "https://10.0.0.9:8081".into(),
        state: EndpointState::Serving as i32,
        ..Default::default()
    };
    put_raw(&mesh, "endpoints/rogue-0", &rogue.encode_to_vec()).await;
    let stored = etcdctl(
        &mesh,
        &[
            "get",
            "--print-value-only",
            &format!("{PREFIX}regions/us-east"),
        ],
        None,
    )
    .await;
    let mut us_east =
        Region::decode(stored.strip_suffix(b"\n").unwrap_or(&stored)).expect("region is protobuf");
    us_east.edge_address = "https://edge.example.com:443".into();
    put_raw(&mesh, "regions/us-east", &us_east.encode_to_vec()).await;

    for edge in &edges {
        for kind in ["endpoint", "region"] {
            wait::until(
                &format!("{kind} skipped at {}", edge.url),
                Duration::from_secs(10),
                || async {
                    (edge_metric(
                        &mesh,
                        edge,
                        "infermesh_edge_routing_table_objects_skipped",
                        &[("kind", kind)],
                    )
                    .await
                        == Some(1.0))
                    .then_some(())
                },
            )
            .await;
        }
    }

    // Later changes still reach both edges: a revoked key is refused and a
    // new key is accepted.
    let id = first.split('_').nth(1).expect("key id").to_string();
    let revoked_at = Instant::now();
    mesh.admin("RevokeApiKey", json!({"id": id}))
        .await
        .expect("revoke");
    for edge in &edges {
        wait::until("revoked key refused", Duration::from_secs(1), || async {
            (chat_status(&first_http, edge).await == 401).then_some(())
        })
        .await;
    }
    eprintln!(
        "revocation refused at both edges {:?} after RevokeApiKey returned",
        revoked_at.elapsed()
    );
    let second = mesh.create_key("acme", json!({})).await;
    let second_http = Http::with_key(&second);
    for edge in &edges {
        wait::until("new key served", Duration::from_secs(5), || async {
            (chat_status(&second_http, edge).await == 200).then_some(())
        })
        .await;
        let ready = mesh
            .http
            .get(&format!("{}/readyz", edge.url))
            .await
            .expect("readyz")
            .json();
        assert_eq!(ready["skipped_objects"], 2, "{ready}");
        assert_eq!(ready["refused_tables"], 0, "{ready}");
        assert!(ready["lag_seconds"].as_f64() < Some(1.0), "{ready}");
        assert_eq!(
            edge_metric(
                &mesh,
                edge,
                "infermesh_edge_routing_table_refusals_total",
                &[]
            )
            .await,
            Some(0.0)
        );
    }
}

#[tokio::test]
async fn addresses_with_a_scheme_are_refused_by_the_admin_api_and_nothing_is_written() {
    let mesh = Mesh::start().await;
    let refused = mesh
        .admin(
            "CreateRegion",
            json!({"region": {"name": "ap-south", "zones": ["ap-south-a"],
                              "edge_address": "https://edge.example.com:443"}}),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, "InvalidArgument", "{refused:?}");
    assert!(
        refused.message.contains("region.edge_address") && refused.message.contains("scheme"),
        "{refused:?}"
    );
    let stored = etcdctl(
        &mesh,
        &[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}regions/"),
        ],
        None,
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&stored).contains("ap-south"),
        "nothing written"
    );
}
