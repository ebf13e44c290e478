//! Leader election across control-plane replicas on one etcd: exactly one
//! leads, and when it is killed another takes over within the lease TTL.

use std::time::{Duration, Instant};

use infermesh_integration_tests::binaries::free_port;
use infermesh_integration_tests::grpcurl::Grpcurl;
use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use infermesh_runtime::tls::PeerRole;
use serde_json::json;

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_within_the_lease_ttl() {
    let mut mesh = Mesh::start().await;
    let second_metrics = format!("127.0.0.1:{}", free_port());
    let second_address = format!("127.0.0.1:{}", free_port());
    let mut second = mesh.spawn_control_plane("control-plane-b", &second_address, &second_metrics);
    // An edge that knows both replicas.
    let edge = mesh
        .start_edge("eu-west", &["--control-plane", &second_address])
        .await;
    let first_url = mesh.control_plane_metrics_url.clone();
    let second_url = format!("http://{second_metrics}/metrics");

    let (first_leads, second_leads) =
        wait::until("exactly one leader", Duration::from_secs(20), || async {
            let a = mesh.leading(&first_url).await?;
            let b = mesh.leading(&second_url).await?;
            (a != b).then_some((a, b))
        })
        .await;
    assert!(first_leads ^ second_leads);

    // Kill the leader (no resignation): the other one leads within the TTL.
    let killed = Instant::now();
    let survivor = if first_leads {
        mesh.kill_control_plane().await;
        second_url.clone()
    } else {
        second.kill().await;
        first_url.clone()
    };
    wait::until("the survivor to lead", Duration::from_secs(20), || async {
        mesh.leading(&survivor).await.filter(|l| *l).map(|_| ())
    })
    .await;
    let took = killed.elapsed();
    eprintln!("new leader after {took:?}");
    assert!(took < Duration::from_secs(8), "leader TTL is 5 s: {took:?}");

    // Admin writes go to the survivor, and the edge (moved to it if its
    // replica was the one killed) receives them.
    let survivor_address = if first_leads {
        second_address.clone()
    } else {
        mesh.control_plane_address.clone()
    };
    let admin = Grpcurl::tls(&survivor_address, &mesh.pki.ca_cert)
        .with_identity(mesh.pki.client(PeerRole::Admin, "integration-tests"));
    wait::until(
        "the survivor to take admin writes",
        Duration::from_secs(20),
        || async {
            admin
                .admin("CreateModel", json!({"model": {"name": "after-failover"}}))
                .await
                .ok()
        },
    )
    .await;
    admin
        .admin("CreateRegion", json!({"region": {"name": "eu-west"}}))
        .await
        .expect("create region");
    admin
        .admin(
            "CreatePool",
            json!({"pool": {"name": "after-eu", "model": "after-failover", "region": "eu-west",
                "engine": "VLLM", "min_replicas": 1, "max_replicas": 1}}),
        )
        .await
        .expect("create pool");
    wait::until(
        "the edge to list the new model",
        Duration::from_secs(20),
        || async {
            mesh.edge_models(&edge)
                .await
                .contains(&"after-failover".to_string())
                .then_some(())
        },
    )
    .await;
}

/// Runs etcdctl against the mesh's etcd; its stdout.
async fn etcdctl(mesh: &Mesh, args: &[&str]) -> String {
    let out = tokio::process::Command::new("etcdctl")
        .arg("--endpoints")
        .arg(&mesh.etcd.url)
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .await
        .expect("etcdctl runs");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_leader_removes_records_whose_object_is_gone() {
    let mesh = Mesh::start_with(&["--gc-interval-seconds".into(), "1".into()]).await;
    let keys = mesh
        .admin("ListApiKeys", json!({}))
        .await
        .expect("list keys");
    let live = keys["keys"][0]["id"]
        .as_str()
        .expect("the mesh's key")
        .to_string();
    let root = "/infermesh-test/";
    etcdctl(
        &mesh,
        &["put", &format!("{root}keyuse/{live}"), "1700000000000"],
    )
    .await;
    etcdctl(
        &mesh,
        &["put", &format!("{root}keyuse/deleted-key"), "1700000000000"],
    )
    .await;
    etcdctl(&mesh, &["put", &format!("{root}scaling/deleted-pool"), ""]).await;
    wait::until("orphans removed", Duration::from_secs(20), || async {
        let left = etcdctl(&mesh, &["get", "--prefix", "--keys-only", root]).await;
        (!left.contains("deleted-key") && !left.contains("deleted-pool")).then_some(())
    })
    .await;
    let left = etcdctl(
        &mesh,
        &["get", "--keys-only", &format!("{root}keyuse/{live}")],
    )
    .await;
    assert!(left.contains(&live), "a live key's record stays: {left:?}");
}

#[tokio::test]
async fn endpoints_register_again_when_the_replica_lease_is_lost() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    wait::until(
        "the endpoint registered",
        Duration::from_secs(20),
        || async { (mesh.endpoint_ids("llama-eu").await.len() == 1).then_some(()) },
    )
    .await;
    // Revoke the lease the endpoint is bound to, as an expiry would end it.
    let leases = etcdctl(&mesh, &["lease", "list"]).await;
    let mut revoked = false;
    for lease in leases
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let held = etcdctl(&mesh, &["lease", "timetolive", lease, "--keys"]).await;
        if held.contains("/endpoints/llama-0") {
            etcdctl(&mesh, &["lease", "revoke", lease]).await;
            revoked = true;
        }
    }
    assert!(revoked, "no lease holds the endpoint: {leases}");
    // The replica notices, takes a new lease, and the sidecar registers again.
    wait::until("the endpoint back", Duration::from_secs(30), || async {
        let left = etcdctl(
            &mesh,
            &[
                "get",
                "--prefix",
                "--keys-only",
                "/infermesh-test/endpoints/",
            ],
        )
        .await;
        left.contains("llama-0").then_some(())
    })
    .await;
    wait::until("the endpoint listed", Duration::from_secs(20), || async {
        (mesh.endpoint_ids("llama-eu").await.len() == 1).then_some(())
    })
    .await;
}
