//! Identities issued by the control plane: join tokens made with grpcurl,
//! edges and sidecars that start with nothing but a token and the CA, and
//! certificates renewed under traffic with no restart and no failed request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use infermesh_integration_tests::kube::FakeKube;
use infermesh_integration_tests::mesh::{Mesh, Sidecar};
use infermesh_integration_tests::process::Process;
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
    bootstrap_flags(mesh, dir, "--join-token-file", token)
}

/// `--identity-dir` with the bootstrap credential `flag` `file`.
fn bootstrap_flags(mesh: &Mesh, dir: &Path, flag: &str, file: &Path) -> Vec<String> {
    [
        "--control-plane-ca",
        mesh.pki.ca_cert.to_str().unwrap(),
        "--identity-dir",
        dir.to_str().unwrap(),
        flag,
        file.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// When the certificate in `dir` became valid, if there is one.
fn issued_at(dir: &Path) -> Option<SystemTime> {
    enroll::held(&dir.join(enroll::IDENTITY_FILE)).map(|held| held.not_before)
}

/// A mesh whose control plane is the CA (`--identity-ttl` when given,
/// and `extra` flags), with pool `llama-eu` registered.
async fn issuing_mesh(ttl: Option<&str>, extra: Vec<String>) -> Mesh {
    let mut mesh = Mesh::start().await;
    let mut flags = vec![
        "--ca-cert".to_string(),
        mesh.pki.ca_cert.to_str().unwrap().into(),
        "--ca-key".into(),
        mesh.pki.ca_key.to_str().unwrap().into(),
    ];
    if let Some(ttl) = ttl {
        flags.extend(["--identity-ttl".into(), ttl.into()]);
    }
    flags.extend(extra);
    mesh.control_plane_extra.extend(flags);
    mesh.kill_control_plane().await;
    mesh.start_control_plane().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    mesh
}

/// Engine `llama-0` (with `engine_flags`) and its sidecar, which starts with
/// only the join token `token`; returns them and the sidecar's identity
/// directory.
async fn enrolled_replica(
    mesh: &Mesh,
    engine_flags: &[&str],
    token: &Path,
) -> (Sidecar, Process, PathBuf) {
    bootstrapped_replica(mesh, engine_flags, "--join-token-file", token).await
}

/// As `enrolled_replica`, with the bootstrap credential `flag` `file`.
async fn bootstrapped_replica(
    mesh: &Mesh,
    engine_flags: &[&str],
    flag: &str,
    file: &Path,
) -> (Sidecar, Process, PathBuf) {
    let (engine_url, engine) = mesh.start_engine("llama-0", "llama", engine_flags).await;
    let dir = mesh.dir.path().join("identity-llama-0");
    let sidecar = mesh
        .start_sidecar_as(
            "llama-0",
            "llama-eu",
            "llama",
            "eu-west",
            &engine_url,
            None,
            bootstrap_flags(mesh, &dir, flag, file),
        )
        .await;
    (sidecar, engine, dir)
}

#[tokio::test]
async fn edges_and_sidecars_renew_sixty_second_identities_under_streaming_traffic() {
    let mesh = issuing_mesh(Some("60s"), Vec::new()).await;

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

    let (sidecar, _engine, sidecar_dir) =
        enrolled_replica(&mesh, &["--decode-ms-per-token", "5"], &sidecar_token).await;
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

#[tokio::test]
async fn a_revoked_sidecar_identity_loses_its_streams_and_its_endpoint() {
    let mesh = issuing_mesh(None, Vec::new()).await;
    let token = join_token(
        &mesh,
        "sidecar",
        json!({"role": "sidecar", "region": "eu-west", "pool": "llama-eu", "uses": 2}),
    )
    .await;
    let (_sidecar, _engine, _dir) = enrolled_replica(&mesh, &[], &token).await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    mesh.wait_until_served(&url, &body).await;

    let call = |method: &'static str, request: Value| {
        let admin = mesh.admin.clone();
        async move {
            admin
                .raw(
                    &["-d", &request.to_string()],
                    &[&format!("infermesh.v1.IdentityService/{method}")],
                )
                .await
                .map(|out| serde_json::from_str::<Value>(&out).expect("JSON reply"))
        }
    };
    let listed = call("ListIssuedIdentities", json!({"prefix": "sidecar/"}))
        .await
        .unwrap();
    assert_eq!(
        listed["identities"][0]["identity"], "sidecar/eu-west/llama-eu/llama-0",
        "{listed}"
    );
    let serial = listed["identities"][0]["certificates"][0]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        listed["identities"][0]["certificates"][0]["via"]
            .as_str()
            .unwrap()
            .starts_with("token:"),
        "{listed}"
    );

    // Bad input is refused by name and changes nothing.
    let bad = call("RevokeIdentity", json!({"identity": "sidecar/../x"}))
        .await
        .unwrap_err();
    assert_eq!(bad.code, "InvalidArgument", "{bad:?}");
    let unknown = call(
        "RevokeIdentity",
        json!({"identity": "sidecar/eu-west/llama-eu/nobody"}),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code, "NotFound", "{unknown:?}");
    let sidecar_cert = mesh.pki.sidecar("eu-west", "llama-eu", "llama-0");
    let not_admin = mesh
        .admin
        .with_identity(sidecar_cert)
        .raw(
            &[
                "-d",
                &json!({"identity": "sidecar/eu-west/llama-eu/llama-0"}).to_string(),
            ],
            &["infermesh.v1.IdentityService/RevokeIdentity"],
        )
        .await
        .unwrap_err();
    assert_eq!(not_admin.code, "PermissionDenied", "{not_admin:?}");
    assert_eq!(
        mesh.endpoint_ids("llama-eu").await,
        vec!["llama-0".to_string()]
    );

    let revoked = call(
        "RevokeIdentity",
        json!({"identity": "spiffe://infermesh/sidecar/eu-west/llama-eu/llama-0"}),
    )
    .await
    .unwrap();
    assert_eq!(revoked["endpointsRemoved"], json!(["llama-0"]), "{revoked}");
    assert_eq!(
        revoked["revocation"]["serials"],
        json!([serial]),
        "{revoked}"
    );

    // Its streams are closed, its endpoint is gone and stays gone, and the
    // edge stops sending to it.
    let control_plane = mesh.control_plane.as_ref().unwrap();
    wait::until(
        "the revoked streams to close",
        Duration::from_secs(10),
        || {
            let log = control_plane.log();
            async move {
                (log.matches("closing the stream of a revoked identity")
                    .count()
                    >= 2)
                    .then_some(())
            }
        },
    )
    .await;
    wait::until(
        "a revoked reconnect to be refused",
        Duration::from_secs(20),
        || {
            let log = control_plane.log();
            async move { log.contains("was revoked").then_some(()) }
        },
    )
    .await;
    assert!(mesh.endpoint_ids("llama-eu").await.is_empty());
    let refused = wait::until(
        "the edge to drop the replica",
        Duration::from_secs(10),
        || async {
            let reply = mesh.http.post_json(&url, &body).await.ok()?;
            (reply.status == 503).then_some(reply)
        },
    )
    .await;
    assert!(
        refused.text().contains("no_healthy_replica"),
        "{}",
        refused.text()
    );
    let listed = call("ListIssuedIdentities", json!({})).await.unwrap();
    assert!(listed.get("identities").is_none(), "{listed}");
    assert_eq!(
        listed["revocations"][0]["identity"], "sidecar/eu-west/llama-eu/llama-0",
        "{listed}"
    );
}

#[tokio::test]
async fn a_pods_service_account_token_gets_it_the_identity_its_annotations_name() {
    let dir = tempfile::tempdir().unwrap();
    let kube = FakeKube::start(dir.path()).await;
    let mesh = issuing_mesh(None, kube.token_review_flags()).await;
    kube.add_pod(
        "gpu",
        "llama-0",
        "uid-0",
        json!({"infermesh.io/pool": "llama-eu", "infermesh.io/region": "eu-west"}),
    );
    let token = kube.pod_token(dir.path(), "gpu", "llama-0", "uid-0", "infermesh");
    let (_sidecar, _engine, _dir) =
        bootstrapped_replica(&mesh, &[], "--service-account-token-file", &token).await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    mesh.wait_until_served(
        &format!("{}/v1/chat/completions", edge.url),
        &json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let listed: Value = serde_json::from_str(
        &mesh
            .admin
            .raw(&[], &["infermesh.v1.IdentityService/ListIssuedIdentities"])
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        listed["identities"][0]["identity"], "sidecar/eu-west/llama-eu/llama-0",
        "{listed}"
    );
    assert_eq!(
        listed["identities"][0]["certificates"][0]["via"],
        "serviceaccount"
    );

    // Refused: a token for another audience, a pod that is gone, a pod
    // whose annotations name nothing, another endpoint id.
    let issue = |token: PathBuf, endpoint: &'static str| {
        let admin = mesh.admin.clone();
        async move {
            let (_, csr) = infermesh_runtime::tls::pki::new_key_and_csr().unwrap();
            let request = json!({"csr_pem": csr,
                "service_account_token": std::fs::read_to_string(token).unwrap(),
                "endpoint_id": endpoint});
            admin
                .raw(
                    &["-d", &request.to_string()],
                    &["infermesh.v1.IdentityService/Issue"],
                )
                .await
                .unwrap_err()
        }
    };
    let other_audience = kube.pod_token(dir.path(), "gpu", "llama-0", "uid-0", "kubernetes");
    let refused = issue(other_audience, "").await;
    assert_eq!(refused.code, "PermissionDenied", "{refused:?}");
    assert!(refused.message.contains("audiences"), "{refused:?}");
    let refused = issue(token.clone(), "llama-9").await;
    assert!(
        refused.message.contains("named after its pod"),
        "{refused:?}"
    );
    kube.add_pod("gpu", "plain-0", "uid-9", json!({}));
    let plain = kube.pod_token(dir.path(), "gpu", "plain-0", "uid-9", "infermesh");
    let refused = issue(plain, "").await;
    assert!(refused.message.contains("neither"), "{refused:?}");
    kube.remove_pod("gpu", "llama-0");
    let refused = issue(token, "").await;
    assert!(refused.message.contains("no longer exists"), "{refused:?}");
}
