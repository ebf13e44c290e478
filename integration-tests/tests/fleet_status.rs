//! The fleet status through the real grpcurl against two control-plane
//! replicas on one etcd: an edge attached to one replica and a sidecar to
//! the other are listed by either replica, each with the replica it is
//! attached to, the version it acknowledged and no lag. A table the
//! sidecar refuses shows on both with its reason, and clears from the lag
//! once a table it takes follows. Reflection describes the new methods, and
//! a filter that is not a role or a region name is INVALID_ARGUMENT naming
//! the field.

use std::time::Duration;

use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::grpcurl::Grpcurl;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::{scrape, wait};
use infermesh_proto::v1::{Endpoint, EndpointState};
use infermesh_runtime::tls::PeerRole;
use prost::Message;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);
const ENDPOINT_KEY: &str = "/infermesh-test/endpoints/llama-0";

/// A 64-bit field as grpcurl prints it (a string), 0 when left out.
fn number(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.parse().expect("a decimal number"),
        Value::Number(n) => n.as_u64().expect("a whole number"),
        _ => 0,
    }
}

/// The subscriber of `role` in a ListSubscribers or GetFleetStatus answer.
fn subscriber<'a>(answer: &'a Value, role: &str) -> Option<&'a Value> {
    answer["subscribers"]
        .as_array()?
        .iter()
        .find(|s| s["role"] == role)
}

/// In sync: it acknowledged the version offered, and some version was offered.
fn in_sync(subscriber: &Value) -> bool {
    let offered = number(&subscriber["offeredVersion"]);
    offered > 0
        && number(&subscriber["ackedVersion"]) == offered
        && number(&subscriber["lagVersions"]) == 0
        && subscriber["lagSeconds"].as_f64().unwrap_or(0.0) == 0.0
}

/// What must read the same from every replica: who, where, and versions.
fn comparable(answer: &Value) -> Vec<(String, String, String, u64, u64, String)> {
    answer["subscribers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    (
                        s["role"].as_str().unwrap_or_default().to_string(),
                        s["nodeId"].as_str().unwrap_or_default().to_string(),
                        s["controlPlane"].as_str().unwrap_or_default().to_string(),
                        number(&s["offeredVersion"]),
                        number(&s["ackedVersion"]),
                        s["lastNack"]["reason"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Rewrites the sidecar's endpoint in etcd with `state`, keeping its lease,
/// as a write around the control plane would.
async fn put_endpoint_state(mesh: &Mesh, state: i32) {
    let stored = mesh
        .etcd
        .ctl(&["get", "--print-value-only", ENDPOINT_KEY], None)
        .await;
    let mut endpoint = Endpoint::decode(stored.strip_suffix(b"\n").unwrap_or(&stored))
        .expect("the endpoint is protobuf");
    endpoint.state = state;
    mesh.etcd
        .ctl(
            &["put", "--ignore-lease", ENDPOINT_KEY],
            Some(&endpoint.encode_to_vec()),
        )
        .await;
}

/// Waits until both replicas answer `method` with `request` so that `check`
/// holds, and the two answers agree on every subscriber; the answers.
async fn until_both(
    what: &str,
    replicas: &[Grpcurl; 2],
    method: &str,
    request: Value,
    check: impl Fn(&Value) -> bool,
) -> [Value; 2] {
    wait::until(what, DEADLINE, || async {
        let first = replicas[0].admin(method, request.clone()).await.ok()?;
        let second = replicas[1].admin(method, request.clone()).await.ok()?;
        (check(&first) && check(&second) && comparable(&first) == comparable(&second))
            .then_some([first, second])
    })
    .await
}

#[tokio::test]
async fn either_replica_lists_every_subscriber_in_sync_and_a_refusal_with_its_reason() {
    let mut mesh = Mesh::start_with(&["--load-exchange-interval-ms".into(), "200".into()]).await;
    let first_address = mesh.control_plane_address.clone();
    let second_address = format!("127.0.0.1:{}", free_port());
    let second_metrics = format!("127.0.0.1:{}", free_port());
    let _second = mesh.spawn_control_plane("control-plane-b", &second_address, &second_metrics);
    let replicas = [
        mesh.admin.clone(),
        Grpcurl::tls(&second_address, &mesh.pki.ca_cert)
            .with_identity(mesh.pki.client(PeerRole::Admin, "integration-tests")),
    ];
    wait::until("the second replica to serve", DEADLINE, || async {
        let out = replicas[1]
            .raw(&[], &["grpc.health.v1.Health/Check"])
            .await
            .ok()?;
        out.contains("\"SERVING\"").then_some(())
    })
    .await;

    mesh.register("eu-west", "llama", "llama-eu").await;
    let _edge = mesh.start_edge("eu-west", &[]).await;
    // The sidecar (its load reports and its routing-table stream) attaches
    // to the second replica.
    mesh.control_plane_address = second_address.clone();
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    mesh.control_plane_address = first_address;

    let [listed, _] = until_both(
        "both subscribers in sync, listed by both replicas",
        &replicas,
        "ListSubscribers",
        json!({}),
        |answer| {
            answer["subscribers"].as_array().map(Vec::len) == Some(2)
                && ["EDGE", "SIDECAR"]
                    .iter()
                    .all(|role| subscriber(answer, role).is_some_and(in_sync))
        },
    )
    .await;
    let edge = subscriber(&listed, "EDGE").expect("the edge");
    let sidecar = subscriber(&listed, "SIDECAR").expect("the sidecar");
    assert_eq!(edge["controlPlane"], "control-plane", "{listed}");
    assert_eq!(edge["region"], "eu-west");
    assert_eq!(edge["identity"], "edge/eu-west", "{listed}");
    assert!(
        edge["nodeId"]
            .as_str()
            .is_some_and(|n| n.starts_with("edge-eu-west-")),
        "{listed}"
    );
    assert_eq!(sidecar["controlPlane"], "control-plane-b", "{listed}");
    assert_eq!(sidecar["nodeId"], "llama-0");
    assert_eq!(sidecar["identity"], "sidecar/eu-west/llama-eu/llama-0");
    for s in [edge, sidecar] {
        assert!(
            s["remoteAddress"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{s}"
        );
        assert!(number(&s["ackedAtUnixMs"]) > 0, "{s}");
        assert!(s.get("lastNack").is_none(), "{s}");
    }
    assert_eq!(
        listed["controlPlanes"],
        json!(["control-plane", "control-plane-b"])
    );

    // Filters: by role, by region.
    for replica in &replicas {
        let sidecars = replica
            .admin("ListSubscribers", json!({"role": "SIDECAR"}))
            .await
            .expect("ListSubscribers by role");
        let roles: Vec<_> = sidecars["subscribers"]
            .as_array()
            .map(|l| l.iter().map(|s| s["role"].clone()).collect())
            .unwrap_or_default();
        assert_eq!(roles, [json!("SIDECAR")], "{sidecars}");
        let elsewhere = replica
            .admin("ListSubscribers", json!({"region": "us-east"}))
            .await
            .expect("ListSubscribers by region");
        assert!(elsewhere.get("subscribers").is_none(), "{elsewhere}");
    }

    // The fleet status: the same subscribers, and the endpoint with the
    // load it reported to the second replica, from either replica.
    let statuses = until_both(
        "the fleet status with the endpoint's load",
        &replicas,
        "GetFleetStatus",
        json!({"region": "eu-west"}),
        |answer| {
            let endpoint = &answer["regions"][0]["pools"][0]["endpoints"][0];
            endpoint["id"] == "llama-0"
                && endpoint.get("loadAgeMs").is_some()
                && answer["subscribers"].as_array().map(Vec::len) == Some(2)
        },
    )
    .await;
    for (status, answered_by) in statuses.iter().zip(["control-plane", "control-plane-b"]) {
        assert_eq!(status["answeredBy"], answered_by, "{status}");
        assert_eq!(comparable(status), comparable(&listed), "{status}");
        let region = &status["regions"][0];
        assert_eq!(region["name"], "eu-west");
        assert_eq!(region["registered"], true);
        let pool = &region["pools"][0];
        assert_eq!(
            (&pool["name"], &pool["model"]),
            (&json!("llama-eu"), &json!("llama"))
        );
        let endpoint = &pool["endpoints"][0];
        assert_eq!(endpoint["state"], "SERVING", "{status}");
        assert!(
            endpoint["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
        );
        assert!(
            endpoint["fingerprint"]
                .as_str()
                .is_some_and(|f| !f.is_empty()),
            "{status}"
        );
        assert!(number(&endpoint["loadAgeMs"]) < 10_000, "{status}");
    }

    // A table the sidecar refuses: its endpoint with a state it does not know.
    put_endpoint_state(&mesh, 7).await;
    let [refused, _] = until_both(
        "the sidecar's refusal on both replicas",
        &replicas,
        "ListSubscribers",
        json!({"role": "SIDECAR"}),
        |answer| {
            subscriber(answer, "SIDECAR").is_some_and(|s| {
                let offered = number(&s["offeredVersion"]);
                number(&s["lastNack"]["version"]) == offered
                    && number(&s["lagVersions"])
                        == offered.saturating_sub(number(&s["ackedVersion"]))
                    && number(&s["lagVersions"]) > 0
            })
        },
    )
    .await;
    let nack = &subscriber(&refused, "SIDECAR").expect("the sidecar")["lastNack"];
    assert!(
        nack["reason"]
            .as_str()
            .is_some_and(|r| r.contains("llama-0") && r.contains("unknown state 7")),
        "{refused}"
    );
    let metrics = format!("http://{second_metrics}/metrics");
    wait::until("the refusal counted and the lag seen", DEADLINE, || async {
        let text = mesh.http.get(&metrics).await.ok()?.text();
        let labels = [("role", "sidecar"), ("region", "eu-west")];
        let nacks = scrape::value(
            &text,
            "infermesh_control_plane_subscriber_nacks_total",
            &labels,
        )?;
        let lag = scrape::value(
            &text,
            "infermesh_control_plane_subscriber_lag_versions",
            &labels,
        )?;
        (nacks >= 1.0 && lag >= 1.0).then_some(())
    })
    .await;

    // A table it takes ends the lag; the refusal stays on record.
    put_endpoint_state(&mesh, EndpointState::Serving as i32).await;
    until_both(
        "the sidecar back in sync, its refusal kept",
        &replicas,
        "ListSubscribers",
        json!({"role": "SIDECAR"}),
        |answer| {
            subscriber(answer, "SIDECAR").is_some_and(|s| {
                in_sync(s)
                    && s["lastNack"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("unknown state 7"))
            })
        },
    )
    .await;
}

#[tokio::test]
async fn reflection_describes_the_fleet_methods_and_bad_filters_name_their_field() {
    let mesh = Mesh::start().await;
    let described = mesh
        .admin
        .raw(&[], &["describe", "infermesh.v1.AdminService"])
        .await
        .expect("describe");
    for method in ["rpc GetFleetStatus", "rpc ListSubscribers"] {
        assert!(described.contains(method), "{described}");
    }
    let message = mesh
        .admin
        .raw(&[], &["describe", "infermesh.v1.SubscriberStatus"])
        .await
        .expect("describe SubscriberStatus");
    assert!(message.contains("lag_versions"), "{message}");

    let refused = mesh
        .admin("ListSubscribers", json!({"role": 7}))
        .await
        .unwrap_err();
    assert_eq!(refused.code, "InvalidArgument", "{refused:?}");
    assert!(refused.message.starts_with("role:"), "{refused:?}");
    for method in ["ListSubscribers", "GetFleetStatus"] {
        let refused = mesh
            .admin(method, json!({"region": "EU West"}))
            .await
            .unwrap_err();
        assert_eq!(refused.code, "InvalidArgument", "{method}: {refused:?}");
        assert!(refused.message.contains("region"), "{method}: {refused:?}");
    }

    // An empty fleet answers, with the answering replica in it.
    let status = mesh
        .admin("GetFleetStatus", json!({}))
        .await
        .expect("GetFleetStatus");
    assert_eq!(status["answeredBy"], "control-plane", "{status}");
    assert_eq!(
        status["controlPlanes"],
        json!(["control-plane"]),
        "{status}"
    );
}
