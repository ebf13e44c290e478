//! Identities issued by the control plane: join tokens made with grpcurl,
//! edges and sidecars that start with nothing but a token and the CA, and
//! certificates renewed under traffic with no restart and no failed request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::wait;
use infermesh_runtime::enroll;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

/// Makes a join token through grpcurl and writes its secret to `DIR/<name>`.
async fn join_token(mesh: &Mesh, name: &str, request: Value) -> PathBuf {
    let out = mesh
        .admin
        .raw(
            &["-d", &request.to_string()],
            &["infermesh.v1.IdentityService/CreateJoinToken"],
        )
        .await
        .expect("CreateJoinToken");
    let reply: Value = serde_json::from_str(&out).expect("JSON reply");
    let secret = reply["secret"].as_str().expect("a secret").to_string();
    assert!(secret.starts_with("imjt_"), "{reply}");
    let path = mesh.dir.path().join(format!("token-{name}"));
    std::fs::write(&path, secret).unwrap();
    path
}

fn identity_flags(mesh: &Mesh, dir: &Path, token: &Path) -> Vec<String> {
    [
        "--control-plane-ca",
        mesh.pki.ca_cert.to_str().unwrap(),
        "--identity-dir",
        dir.to_str().unwrap(),
        "--join-token-file",
        token.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// When the certificate in `dir` became valid, if there is one.
fn issued_at(dir: &Path) -> Option<SystemTime> {
    enroll::held(&dir.join(enroll::IDENTITY_FILE)).map(|held| held.not_before)
}

#[tokio::test]
async fn edges_and_sidecars_renew_sixty_second_identities_under_streaming_traffic() {
    let mut mesh = Mesh::start().await;
    let ca = [
        "--ca-cert".to_string(),
        mesh.pki.ca_cert.to_str().unwrap().into(),
        "--ca-key".into(),
        mesh.pki.ca_key.to_str().unwrap().into(),
        "--identity-ttl".into(),
        "60s".into(),
    ];
    mesh.control_plane_extra.extend(ca);
    mesh.kill_control_plane().await;
    mesh.start_control_plane().await;
    mesh.register("eu-west", "llama", "llama-eu").await;

    let edge_token = join_token(&mesh, "edge", json!({"role": "edge", "region": "eu-west"})).await;
    let sidecar_token = join_token(
        &mesh,
        "sidecar",
        json!({"role": "sidecar", "region": "eu-west", "pool": "llama-eu", "ttl_seconds": 600}),
    )
    .await;
    let listed = mesh
        .admin
        .raw(&[], &["infermesh.v1.IdentityService/ListJoinTokens"])
        .await
        .unwrap();
    assert!(
        !listed.contains("imjt_"),
        "secrets are never listed: {listed}"
    );
    assert!(listed.contains("llama-eu"), "{listed}");

    let (engine_url, _engine) = mesh
        .start_engine("llama-0", "llama", &["--decode-ms-per-token", "5"])
        .await;
    let sidecar_dir = mesh.dir.path().join("identity-sidecar");
    let sidecar = mesh
        .start_sidecar_as(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &engine_url,
            None,
            identity_flags(&mesh, &sidecar_dir, &sidecar_token),
        )
        .await;
    let edge_dir = mesh.dir.path().join("identity-edge");
    let edge = mesh
        .start_edge_as(
            "eu-west",
            identity_flags(&mesh, &edge_dir, &edge_token),
            &[],
        )
        .await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "stream": true, "max_tokens": 20,
        "messages": [{"role": "user", "content": "count to twenty"}]});
    mesh.wait_until_served(
        &url,
        &json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;

    // The single-use sidecar token is spent: another process cannot use it.
    let (other_engine, _other) = mesh.start_engine("llama-1", "llama", &[]).await;
    let other_dir = mesh.dir.path().join("identity-other");
    let mut refused = infermesh_integration_tests::process::Process::spawn(
        "sidecar-llama-1",
        &infermesh_integration_tests::binaries::path("infermesh-sidecar"),
        &[
            vec![
                "--endpoint-id".into(),
                "llama-1".into(),
                "--pool".into(),
                "llama-eu".into(),
                "--model".into(),
                "llama".into(),
                "--region".into(),
                "eu-west".into(),
                "--engine-url".into(),
                other_engine,
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--advertise-address".into(),
                "127.0.0.1:1".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--control-plane".into(),
                mesh.control_plane_address.clone(),
            ],
            identity_flags(&mesh, &other_dir, &sidecar_token),
        ]
        .concat(),
        mesh.dir.path(),
        &[],
    );
    wait::until(
        "the second sidecar to give up",
        Duration::from_secs(20),
        || {
            let exited = !refused.is_running();
            async move { exited.then_some(()) }
        },
    )
    .await;
    let log = refused.log();
    assert!(log.contains("refused to issue an identity"), "{log}");
    assert!(issued_at(&other_dir).is_none());

    // Stream steadily until each identity has been renewed three times.
    let started = Instant::now();
    let mut edge_certs = BTreeSet::new();
    let mut sidecar_certs = BTreeSet::new();
    let mut streams = 0u32;
    while edge_certs.len() < 4 || sidecar_certs.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(200),
            "renewals seen: edge {}, sidecar {} after {streams} streams",
            edge_certs.len() - 1,
            sidecar_certs.len() - 1
        );
        edge_certs.extend(issued_at(&edge_dir));
        sidecar_certs.extend(issued_at(&sidecar_dir));
        let streamed = mesh.http.post_stream(&url, &body).await.expect("a stream");
        assert_eq!(streamed.status, 200, "stream {streams}");
        let text: String = streamed
            .frames
            .iter()
            .map(|(_, data)| String::from_utf8_lossy(data).into_owned())
            .collect();
        assert!(
            text.contains("data: [DONE]"),
            "stream {streams} was cut: {text}"
        );
        streams += 1;
    }
    // Every one of them lived about a minute, and no process restarted to pick them up.
    let life = enroll::held(&edge_dir.join(enroll::IDENTITY_FILE)).unwrap();
    let lifetime = life.not_after.duration_since(life.not_before).unwrap();
    assert!(lifetime <= Duration::from_secs(70), "{lifetime:?}");
    let log = edge.process.log();
    assert_eq!(log.matches("edge serving").count(), 1, "{log}");

    // A new connection to the sidecar is served its newest certificate.
    let address = sidecar.url.rsplit_once('@').unwrap().1.to_string();
    let newest = std::fs::read(sidecar_dir.join(enroll::IDENTITY_FILE)).unwrap();
    let newest: Vec<u8> = rustls::pki_types::CertificateDer::pem_slice_iter(&newest)
        .next()
        .expect("a certificate")
        .unwrap()
        .to_vec();
    wait::until(
        "the sidecar to serve its newest certificate",
        Duration::from_secs(10),
        || async {
            let tcp = tokio::net::TcpStream::connect(&address).await.ok()?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let tls = tokio_rustls::TlsConnector::from(mesh.edge_tls.config.clone())
                .connect(name, tcp)
                .await
                .ok()?;
            let served = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
            (served == newest).then_some(())
        },
    )
    .await;
}
