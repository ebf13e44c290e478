//! Registrations bound to identity, through real processes: a sidecar
//! certificate names one endpoint of one pool in one region; registering
//! another endpoint, pool or region, or advertising an address that is not
//! the caller's own, is refused with PERMISSION_DENIED before anything is
//! written (checked with the real `etcdctl`), and a certificate that names
//! no endpoint cannot register at all. The real sidecar, with its own
//! certificate, registers and is routed to.

use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::pki::CertPair;
use infermesh_runtime::tls::PeerRole;
use serde_json::{Value, json};

/// Opens a load-report stream as `identity` whose first message is `register`.
async fn register_as(
    mesh: &Mesh,
    identity: CertPair,
    register: Value,
) -> Result<String, infermesh_integration_tests::grpcurl::GrpcError> {
    let first = json!({ "register": register });
    mesh.admin
        .with_identity(identity)
        .raw(
            &["-d", &first.to_string(), "-max-time", "10"],
            &["infermesh.v1.LoadReportService/Report"],
        )
        .await
}

async fn stored_endpoints(mesh: &Mesh) -> String {
    let keys = mesh
        .etcd
        .ctl(
            &[
                "get",
                "--prefix",
                "--keys-only",
                "/infermesh-test/endpoints/",
            ],
            None,
        )
        .await;
    String::from_utf8_lossy(&keys).trim().to_string()
}

#[tokio::test]
async fn a_sidecar_registers_only_the_endpoint_its_certificate_names_at_its_own_address() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    mesh.register("eu-west", "qwen", "qwen-eu").await;
    let mine = mesh.pki.sidecar("eu-west", "llama-eu", "llama-0");
    let own = json!({"endpoint_id": "llama-0", "pool": "llama-eu", "model": "llama",
                     "region": "eu-west", "address": "127.0.0.1:18081", "engine": "VLLM"});
    let with = |field: &str, value: &str| {
        let mut changed = own.clone();
        changed[field] = json!(value);
        changed
    };
    let attempts = [
        (with("endpoint_id", "llama-1"), "endpoint \"llama-0\" only"),
        (with("pool", "qwen-eu"), "pool \"llama-eu\" only"),
        (with("region", "us-east"), "region \"eu-west\" only"),
        (
            with("address", "10.0.0.9:8081"),
            "not this sidecar's own address",
        ),
        (with("address", "attacker.example:443"), "not a name"),
    ];
    for (register, why) in attempts {
        let refused = register_as(&mesh, mine.clone(), register.clone())
            .await
            .unwrap_err();
        assert_eq!(refused.code, "PermissionDenied", "{register}: {refused:?}");
        assert!(refused.message.contains(why), "{register}: {refused:?}");
        assert_eq!(
            stored_endpoints(&mesh).await,
            "",
            "nothing written for {register}"
        );
    }

    // A certificate shared by many pods names no endpoint: it cannot register.
    let shared = mesh.pki.client(PeerRole::Sidecar, "shared");
    let refused = register_as(&mesh, shared, own.clone()).await.unwrap_err();
    assert_eq!(refused.code, "PermissionDenied", "{refused:?}");
    assert!(refused.message.contains("names no endpoint"), "{refused:?}");
    assert_eq!(stored_endpoints(&mesh).await, "");

    let metrics = mesh
        .http
        .get(&mesh.control_plane_metrics_url)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(
            "infermesh_control_plane_registrations_refused_total{code=\"permission_denied\"} 6"
        ),
        "{metrics}"
    );

    // The real sidecar, with its own certificate, registers and is listed.
    let _replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    infermesh_integration_tests::wait::until(
        "llama-0 registered",
        std::time::Duration::from_secs(10),
        || async { (mesh.endpoint_ids("llama-eu").await == ["llama-0"]).then_some(()) },
    )
    .await;
    assert!(stored_endpoints(&mesh).await.ends_with("endpoints/llama-0"));
}
