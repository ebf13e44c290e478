//! Transport security and admission through real processes: the control
//! plane's admin API with certificates and bearer tokens (real grpcurl),
//! subscriber roles checked against client certificates, the edge's HTTPS
//! with h2/HTTP/1.1 by ALPN and certificate reload without restart (real
//! curl), and the edge cutting off oversized and slow request heads.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_integration_tests::mesh::Mesh;
use infermesh_integration_tests::pki::{CertPair, TestPki};
use infermesh_integration_tests::{scrape, wait};
use infermesh_runtime::tls::PeerRole;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn the_admin_api_needs_an_admin_certificate_or_an_admin_token() {
    let mesh = Mesh::start().await;
    let anonymous = mesh.admin.without_identity();

    let refused = anonymous.admin("ListModels", json!({})).await.unwrap_err();
    assert_eq!(refused.code, "Unauthenticated", "{refused:?}");
    assert!(refused.message.contains("Bearer"), "{refused:?}");

    let with_token = anonymous.with_header(&format!("authorization: Bearer {}", mesh.admin_token));
    let listed = with_token.admin("ListModels", json!({})).await;
    assert!(listed.is_ok(), "{listed:?}");

    let wrong = anonymous.with_header("authorization: Bearer imadm_not-a-real-token");
    let refused = wrong.admin("ListModels", json!({})).await.unwrap_err();
    assert_eq!(refused.code, "Unauthenticated", "{refused:?}");
    assert!(refused.message.contains("not recognised"), "{refused:?}");

    let edge = anonymous.with_identity(mesh.pki.client(PeerRole::Edge, "eu-west"));
    let refused = edge.admin("ListApiKeys", json!({})).await.unwrap_err();
    assert_eq!(refused.code, "PermissionDenied", "{refused:?}");

    // A certificate from another CA does not get through the handshake at all.
    let foreign = TestPki::foreign_client(mesh.dir.path(), PeerRole::Admin, "mallory");
    let refused = anonymous
        .with_identity(foreign)
        .admin("ListModels", json!({}))
        .await
        .unwrap_err();
    assert!(
        refused.code.is_empty(),
        "handshake should fail: {refused:?}"
    );

    // Probes and schema discovery stay open.
    let health = anonymous.raw(&[], &["grpc.health.v1.Health/Check"]).await;
    assert!(health.is_ok_and(|out| out.contains("SERVING")));
    let services = anonymous.raw(&[], &["list"]).await.expect("reflection");
    assert!(services.contains("infermesh.v1.AdminService"), "{services}");

    // Plaintext is not served at all on a TLS control plane.
    let plaintext = infermesh_integration_tests::grpcurl::Grpcurl::new(&mesh.control_plane_address)
        .raw(&[], &["grpc.health.v1.Health/Check"])
        .await;
    assert!(plaintext.is_err(), "{plaintext:?}");
}

/// Opens a discovery stream through grpcurl as `identity`, says hello as
/// `role` of `region`, and returns the first response or the error.
async fn subscribe(
    mesh: &Mesh,
    identity: Option<CertPair>,
    role: &str,
    region: &str,
) -> Result<String, infermesh_integration_tests::grpcurl::GrpcError> {
    let grpcurl = match identity {
        Some(identity) => mesh.admin.with_identity(identity),
        None => mesh.admin.without_identity(),
    };
    let hello = json!({"hello": {"role": role, "region": region, "node_id": "probe-0"}});
    grpcurl
        .raw(
            &["-d", &hello.to_string(), "-max-time", "10"],
            &["infermesh.v1.DiscoveryService/Subscribe"],
        )
        .await
}

#[tokio::test]
async fn subscribers_are_held_to_the_role_and_region_of_their_certificate() {
    let mesh = Mesh::start().await;
    let pki = &mesh.pki;

    let sidecar = pki.client(PeerRole::Sidecar, "llama-0");
    let refused = subscribe(&mesh, Some(sidecar.clone()), "EDGE", "eu-west")
        .await
        .unwrap_err();
    assert_eq!(refused.code, "PermissionDenied", "{refused:?}");

    let as_sidecar = subscribe(&mesh, Some(sidecar.clone()), "SIDECAR", "eu-west")
        .await
        .expect("a sidecar may subscribe as a sidecar");
    assert!(as_sidecar.contains("\"table\""), "{as_sidecar}");
    assert!(!as_sidecar.contains("apiKeys"), "{as_sidecar}");

    let edge = pki.client(PeerRole::Edge, "eu-west");
    let as_edge = subscribe(&mesh, Some(edge.clone()), "EDGE", "eu-west")
        .await
        .expect("an edge may subscribe for its region");
    assert!(
        as_edge.contains("apiKeys"),
        "the key made at start: {as_edge}"
    );

    let elsewhere = subscribe(&mesh, Some(edge.clone()), "EDGE", "us-east")
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code, "PermissionDenied", "{elsewhere:?}");

    let anonymous = subscribe(&mesh, None, "SIDECAR", "eu-west")
        .await
        .unwrap_err();
    assert_eq!(anonymous.code, "Unauthenticated", "{anonymous:?}");

    let admin = pki.client(PeerRole::Admin, "ops");
    let refused = subscribe(&mesh, Some(admin), "EDGE", "eu-west")
        .await
        .unwrap_err();
    assert_eq!(refused.code, "PermissionDenied", "{refused:?}");

    // Only sidecars report load; an edge's certificate is refused before any write.
    let register = json!({"register": {"endpoint_id": "fake-0", "pool": "p", "model": "m",
        "region": "eu-west", "address": "127.0.0.1:1", "engine": "VLLM"}});
    let refused = mesh
        .admin
        .with_identity(edge)
        .raw(
            &["-d", &register.to_string(), "-max-time", "10"],
            &["infermesh.v1.LoadReportService/Report"],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, "PermissionDenied", "{refused:?}");
    let listed = mesh.admin("ListEndpoints", json!({})).await.unwrap();
    assert!(listed.get("endpoints").is_none(), "{listed}");
}

/// curl against `url`, trusting `ca`, with `args`; returns (status, HTTP version).
async fn curl(url: &str, ca: &Path, args: &[&str]) -> (String, String) {
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl {url}: {out} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (status, version) = out.split_once(' ').expect("status and version");
    (status.to_string(), version.to_string())
}

/// A TLS connection to `address` trusting `ca`, offering no ALPN.
async fn tls_connect(address: &str, ca: &Path) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// The certificate the TLS server at `address` presents, as DER.
async fn served_certificate(address: &str, ca: &Path) -> Vec<u8> {
    let stream = tls_connect(address, ca).await;
    let (_, session) = stream.get_ref();
    session.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn the_edge_serves_https_with_h2_and_http1_and_reloads_its_certificate() {
    let mesh = Mesh::start().await;
    let tls_dir = mesh.dir.path().join("edge-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let pair = CertPair {
        cert: tls_dir.join("edge.pem"),
        key: tls_dir.join("edge-key.pem"),
    };
    mesh.pki.reissue_server(&pair);
    let cert = pair.cert.display().to_string();
    let key = pair.key.display().to_string();
    let edge = mesh
        .start_edge(
            "eu-west",
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-reload-interval-ms",
                "100",
                "--header-read-timeout-ms",
                "1000",
            ],
        )
        .await;
    assert!(edge.url.starts_with("https://"), "{}", edge.url);
    let ca = mesh.pki.ca_cert.clone();
    let auth = format!("authorization: Bearer {}", mesh.api_key);

    let livez = format!("{}/livez", edge.url);
    assert_eq!(
        curl(&livez, &ca, &["--http2"]).await,
        ("200".into(), "2".into())
    );
    assert_eq!(
        curl(&livez, &ca, &["--http1.1"]).await,
        ("200".into(), "1.1".into())
    );
    let models = format!("{}/v1/models", edge.url);
    // Keys are checked against the table: wait until the edge holds one.
    let readyz = format!("{}/readyz", edge.url);
    wait::until(
        "the edge to hold a table",
        Duration::from_secs(20),
        || async { (curl(&readyz, &ca, &["--http2"]).await.0 == "200").then_some(()) },
    )
    .await;
    let (status, _) = curl(&models, &ca, &["--http2", "-H", &auth]).await;
    assert_eq!(status, "200", "authenticated");
    let (status, _) = curl(&models, &ca, &["--http2"]).await;
    assert_eq!(status, "401", "no key over h2");

    let address = edge.url.trim_start_matches("https://").to_string();
    let before = served_certificate(&address, &ca).await;
    assert_eq!(before, pem_der(&pair.cert));
    mesh.pki.reissue_server(&pair);
    let renewed = pem_der(&pair.cert);
    assert_ne!(before, renewed);
    wait::until(
        "the edge to serve the renewed certificate",
        Duration::from_secs(10),
        || {
            let (address, ca, renewed) = (address.clone(), ca.clone(), renewed.clone());
            async move { (served_certificate(&address, &ca).await == renewed).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        curl(&livez, &ca, &["--http2"]).await,
        ("200".into(), "2".into())
    );

    // A client that opens a connection and never starts the handshake is cut
    // off, and so is one that finishes it and then sends nothing.
    assert_cut_off(
        TcpStream::connect(&address).await.unwrap(),
        b"",
        Duration::from_secs(20),
    )
    .await;
    let mut idle = tls_connect(&address, &ca).await;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(20), idle.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

/// Reads from `stream` after writing `sent` until the edge closes it; panics after `deadline`.
/// Returns what the edge wrote before closing.
async fn assert_cut_off(mut stream: TcpStream, sent: &[u8], deadline: Duration) -> Vec<u8> {
    stream.write_all(sent).await.unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {deadline:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn oversized_heads_get_431_and_slow_heads_are_cut_off_while_others_are_served() {
    let mesh = Mesh::start().await;
    let edge = mesh
        .start_edge(
            "eu-west",
            &[
                "--header-read-timeout-ms",
                "500",
                "--max-header-bytes",
                "16384",
            ],
        )
        .await;
    let address = edge.url.trim_start_matches("http://").to_string();

    let big = "a".repeat(20_000);
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: edge\r\nx-padding: {big}\r\n\r\n");
    let mut stream = TcpStream::connect(&address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut head))
        .await
        .expect("an answer to an oversized head")
        .unwrap();
    let status_line = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(status_line.starts_with("HTTP/1.1 431"), "{status_line:?}");

    // Headers trickled in one byte at a time never complete: the edge closes
    // the connection once the header deadline passes, while another client
    // is served normally meanwhile.
    let mut slow = TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if slow.write_all(b"x").await.is_err() {
                return started.elapsed();
            }
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                _ => {}
            }
        }
        panic!("a slow client was never cut off");
    });
    let livez = mesh.http.get(&format!("{}/livez", edge.url)).await.unwrap();
    assert_eq!(livez.status, 200);
    let cut_after = trickle.await.unwrap();
    assert!(cut_after < Duration::from_secs(30), "{cut_after:?}");

    // An idle connection that never sends a byte is closed too.
    assert_cut_off(
        TcpStream::connect(&address).await.unwrap(),
        b"",
        Duration::from_secs(20),
    )
    .await;
    let livez = mesh.http.get(&format!("{}/livez", edge.url)).await.unwrap();
    assert_eq!(livez.status, 200, "the edge keeps serving");
}

/// Sends `head` and then one body byte every 100 ms (never all of it);
/// returns what the edge answered and when the connection was closed.
async fn trickle_body(address: &str, head: &str) -> (String, Duration) {
    let mut slow = TcpStream::connect(address).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        let _ = slow.write_all(b" ").await;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&answer).into_owned(),
                    started.elapsed(),
                );
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    panic!(
        "a trickled body was never cut off; got {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn trickled_bodies_are_cut_at_the_body_deadline_and_probes_never_read_one() {
    let mesh = Mesh::start().await;
    let edge = mesh.start_edge("eu-west", &["--body-timeout", "1s"]).await;
    let address = edge.url.trim_start_matches("http://").to_string();
    let secret = mesh.create_key("acme", json!({})).await;
    let keyed = infermesh_integration_tests::client::Http::with_key(&secret);
    infermesh_integration_tests::wait::until("key known", Duration::from_secs(10), || async {
        let models = keyed.get(&format!("{}/v1/models", edge.url)).await.ok()?;
        (models.status == 200).then_some(())
    })
    .await;

    // A probe with a body that never ends is answered at once, and its
    // connection is closed rather than kept for the body.
    let (answer, closed_after) = trickle_body(
        &address,
        "GET /readyz HTTP/1.1\r\nhost: edge\r\ncontent-length: 1000000\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(closed_after < Duration::from_secs(1), "{closed_after:?}");

    // An inference request trickling its body is cut when the deadline
    // passes, with a 408 in OpenAI's shape, while another client is served.
    let other = tokio::spawn({
        let url = format!("{}/livez", edge.url);
        let http = mesh.http.clone();
        async move {
            let mut served = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(800) {
                assert_eq!(http.get(&url).await.unwrap().status, 200);
                served += 1;
            }
            served
        }
    });
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {secret}\r\n\
         content-type: application/json\r\ncontent-length: 1000000\r\n\r\n{{"
    );
    let (answer, cut_after) = trickle_body(&address, &head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request_timeout"), "{answer:?}");
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(5),
        "cut after {cut_after:?} with a 1 s deadline"
    );
    assert!(
        other.await.unwrap() > 0,
        "another client was served meanwhile"
    );
}

#[tokio::test]
async fn the_clients_api_key_never_reaches_the_replica() {
    let mesh = Mesh::start().await;
    mesh.register("eu-west", "llama", "llama-eu").await;
    let replica = mesh
        .start_replica("llama-0", "llama-eu", "llama", "eu-west", &[])
        .await;
    let edge = mesh.start_edge("eu-west", &[]).await;
    let secret = mesh.create_key("acme", json!({})).await;
    let url = format!("{}/v1/chat/completions", edge.url);
    let body =
        json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for header in ["authorization", "x-api-key"] {
        let value = if header == "authorization" {
            format!("Bearer {secret}")
        } else {
            secret.clone()
        };
        let http = infermesh_integration_tests::client::Http::new();
        let reply = infermesh_integration_tests::wait::until(
            "served with the key",
            Duration::from_secs(10),
            || async {
                let reply = http
                    .send(
                        http::Method::POST,
                        &url,
                        Some(body.to_string().into()),
                        &[("content-type", "application/json"), (header, &value)],
                    )
                    .await
                    .ok()?;
                (reply.status == 200).then_some(reply)
            },
        )
        .await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.headers.get(http::header::SERVER).is_none(),
            "the engine's server header reached the client: {:?}",
            reply.headers
        );
        let heard = mesh.last_engine_request(&replica).await;
        assert_eq!(
            heard.headers["x-sim-credential-headers"], "",
            "the engine received the client's {header} header"
        );
        assert!(
            !String::from_utf8_lossy(&heard.body).contains(&secret),
            "the key is not in the forwarded body"
        );
    }
}

#[tokio::test]
async fn no_network_caller_can_drain_a_replica() {
    let mesh = Mesh::start().await;
    let served = mesh.serve_one_replica().await;
    let (replica, url, body) = (&served.replica, &served.url, &served.body);

    for method in [http::Method::GET, http::Method::POST] {
        let refused = mesh
            .http
            .send(
                method,
                &format!("{}/prestop", replica.sidecar_url),
                None,
                &[("x-no-auth", "1")],
            )
            .await
            .unwrap();
        assert_eq!(refused.status, 403, "{}", refused.text());
        assert!(refused.text().contains("unix socket"), "{}", refused.text());
    }
    let ready = mesh
        .http
        .get(&format!("{}/readyz", replica.sidecar_url))
        .await
        .unwrap();
    assert_eq!(
        ready.status,
        200,
        "the replica is not draining: {}",
        ready.text()
    );
    assert!(!replica.prestop_socket.with_file_name("drained").exists());
    let answered = mesh.http.post_json(url, body).await.unwrap();
    assert_eq!(answered.status, 200, "{}", answered.text());
    assert_eq!(mesh.endpoint_ids("llama-eu").await, ["llama-0"]);
}

#[tokio::test]
async fn the_control_plane_serves_a_renewed_certificate_without_a_restart() {
    let mesh = Mesh::start().await;
    let served = mesh.serve_one_replica().await;
    let (url, body) = (&served.url, &served.body);

    let address = mesh.control_plane_address.clone();
    let before = served_certificate(&address, &mesh.pki.ca_cert).await;
    assert_eq!(before, pem_der(&mesh.pki.server.cert));
    mesh.pki.reissue_server(&mesh.pki.server);
    let renewed = pem_der(&mesh.pki.server.cert);
    assert_ne!(before, renewed);
    infermesh_integration_tests::wait::until(
        "the control plane serves the renewed certificate",
        Duration::from_secs(10),
        || async {
            (served_certificate(&address, &mesh.pki.ca_cert).await == renewed).then_some(())
        },
    )
    .await;
    // Admin calls, new subscriptions and the edge's open stream go on.
    assert!(mesh.admin("ListModels", json!({})).await.is_ok());
    let key = mesh.create_key("acme", json!({})).await;
    let keyed = infermesh_integration_tests::client::Http::with_key(&key);
    infermesh_integration_tests::wait::until(
        "a key created after the renewal reaches the edge",
        Duration::from_secs(10),
        || async { (keyed.post_json(url, body).await.ok()?.status == 200).then_some(()) },
    )
    .await;
}

/// curl's status line for `url` with `args` (no CA check: a sidecar's
/// certificate names a workload, not a host), or `None` when the TLS
/// handshake or the connection failed.
async fn curl_to_sidecar(url: &str, args: &[&str]) -> Option<String> {
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    if !output.status.success() {
        eprintln!("curl {url}: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn a_sidecar_serves_only_edges_and_an_edge_reaches_only_the_endpoint_it_chose() {
    let mesh = Mesh::start().await;
    let served = mesh.serve_one_replica().await;
    let (replica, url, body) = (&served.replica, &served.url, &served.body);
    let address = replica
        .sidecar_url
        .rsplit_once('@')
        .expect("the sidecar URL names its identity")
        .1
        .to_string();
    let chat = format!("https://{address}/v1/chat/completions");
    let chat_body = body.to_string();
    let post = [
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &chat_body,
    ];

    // Plaintext is not spoken at all.
    let plaintext = mesh.http.get(&format!("http://{address}/livez")).await;
    assert!(
        plaintext.is_err(),
        "plaintext answered: {:?}",
        plaintext.map(|r| r.status)
    );

    // Probes need no certificate; requests need an edge's.
    assert_eq!(
        curl_to_sidecar(&format!("https://{address}/livez"), &[])
            .await
            .as_deref(),
        Some("200")
    );
    assert_eq!(curl_to_sidecar(&chat, &post).await.as_deref(), Some("403"));
    let admin = mesh.pki.client(PeerRole::Admin, "ops");
    let other_sidecar = mesh.pki.sidecar("eu-west", "llama-eu", "llama-9");
    for pair in [&admin, &other_sidecar] {
        let (cert, key) = (pair.cert.to_str().unwrap(), pair.key.to_str().unwrap());
        let mut args = vec!["--cert", cert, "--key", key];
        args.extend(post);
        assert_eq!(
            curl_to_sidecar(&chat, &args).await.as_deref(),
            Some("403"),
            "{}",
            pair.cert.display()
        );
    }
    // An edge certificate from another CA does not finish the handshake.
    let foreign = TestPki::foreign_client(mesh.dir.path(), PeerRole::Edge, "eu-west");
    let (cert, key) = (
        foreign.cert.to_str().unwrap(),
        foreign.key.to_str().unwrap(),
    );
    let mut args = vec!["--cert", cert, "--key", key];
    args.extend(post);
    assert_eq!(curl_to_sidecar(&chat, &args).await, None);
    let metrics = mesh.http.get(&replica.sidecar_metrics_url).await.unwrap();
    assert_eq!(
        scrape::value(
            &metrics.text(),
            "infermesh_sidecar_refused_callers_total",
            &[]
        ),
        Some(3.0),
        "{}",
        metrics.text()
    );
    // An edge identity is served, directly and through the edge.
    let direct = mesh
        .http
        .post_json(
            &format!("{}/v1/chat/completions", replica.sidecar_url),
            body,
        )
        .await
        .unwrap();
    assert_eq!(direct.status, 200, "{}", direct.text());
    assert_eq!(mesh.http.post_json(url, body).await.unwrap().status, 200);

    // A registration pointing at llama-0's sidecar under another name: the
    // edge reaches the address, sees llama-0's certificate, and sends nothing.
    mesh.register("eu-west", "mistral", "mistral-eu").await;
    let (mistral_engine, _mistral) = mesh.start_engine("mistral-0", "mistral", &[]).await;
    let _impostor = mesh
        .start_sidecar(
            "mistral-0",
            "mistral-eu",
            "mistral",
            "eu-west",
            &mistral_engine,
            Some(&address),
        )
        .await;
    let mistral = json!({"model": "mistral", "messages": [{"role": "user", "content": "hi"}]});
    let wrong_peer = "the certificate names sidecar/eu-west/llama-eu/llama-0, not sidecar/eu-west/mistral-eu/mistral-0";
    wait::until(
        "the edge to try mistral-0 and refuse its certificate",
        Duration::from_secs(20),
        || async {
            let reply = mesh.http.post_json(url, &mistral).await.ok()?;
            assert!(
                matches!(reply.status, 404 | 502 | 503),
                "{} {}",
                reply.status,
                reply.text()
            );
            served.edge.process.log().contains(wrong_peer).then_some(())
        },
    )
    .await;
    let engine = mesh.last_engine_request(replica).await;
    assert!(!engine.text().contains("mistral"), "{}", engine.text());
}

#[tokio::test]
async fn engine_fields_reach_the_engine_only_where_the_model_allows_them() {
    let mesh = Mesh::start().await;
    let served = mesh.serve_one_replica().await;
    let (replica, url) = (&served.replica, &served.url);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}],
        "priority": -100, "request_id": "someone-elses", "chat_template": "{{ secrets }}",
        "temperature": 0.5});
    let sent = |allowed: &'static str| {
        let body = body.clone();
        let mesh = &mesh;
        async move {
            let reply = mesh.http.post_json(url, &body).await.unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            let seen: serde_json::Value = mesh.last_engine_request(replica).await.json();
            (seen.get(allowed).is_some(), seen)
        }
    };
    let (_, seen) = sent("priority").await;
    for gone in ["priority", "request_id", "chat_template"] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the engine: {seen}"
        );
    }
    assert_eq!(seen["temperature"], 0.5, "{seen}");

    // Bad input: only the gated names, each once.
    let model = mesh
        .admin("GetModel", json!({"name": "llama"}))
        .await
        .unwrap();
    let mut update = model.clone();
    update["engineFields"] = json!(["temperature"]);
    let refused = mesh
        .admin("UpdateModel", json!({"model": update}))
        .await
        .unwrap_err();
    assert_eq!(refused.code, "InvalidArgument", "{refused:?}");
    assert!(
        refused.message.contains("model.engine_fields"),
        "{refused:?}"
    );

    // Allowed for this model: priority passes, the others still do not.
    update["engineFields"] = json!(["priority"]);
    mesh.admin("UpdateModel", json!({"model": update}))
        .await
        .unwrap();
    let seen = wait::until(
        "the edge to allow priority",
        Duration::from_secs(10),
        || async {
            let (passed, seen) = sent("priority").await;
            passed.then_some(seen)
        },
    )
    .await;
    assert_eq!(seen["priority"], -100, "{seen}");
    assert!(seen.get("request_id").is_none(), "{seen}");
    assert!(seen.get("chat_template").is_none(), "{seen}");
}

#[tokio::test]
async fn early_refusals_reach_curl_intact_over_http2() {
    let mesh = Mesh::start().await;
    let cert = mesh.pki.server.cert.display().to_string();
    let key = mesh.pki.server.key.display().to_string();
    let edge = mesh
        .start_edge(
            "eu-west",
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--auth-failures-per-minute",
                "1000",
            ],
        )
        .await;
    let ca = mesh.pki.ca_cert.clone();
    let url = format!("{}/v1/chat/completions", edge.url);
    // A 78-byte body with a key the edge does not know: refused before the
    // body matters, 30 times over one protocol each, never as a reset stream.
    let body = r#"{"model":"llama","messages":[{"role":"user","content":"hello there, edge!!"}]}"#;
    assert_eq!(body.len(), 78);
    let bad_key = "authorization: Bearer imk_aaaaaaaaaaaa_not-a-key";
    let args = [
        "-H",
        bad_key,
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ];
    wait::until(
        "the edge to hold a table",
        Duration::from_secs(20),
        || async { (curl(&url, &ca, &args).await.0 == "401").then_some(()) },
    )
    .await;
    for protocol in ["--http2", "--http1.1"] {
        let mut statuses = std::collections::BTreeMap::new();
        for _ in 0..30 {
            let with_protocol: Vec<&str> = std::iter::once(protocol).chain(args).collect();
            let (status, _) = curl(&url, &ca, &with_protocol).await;
            *statuses.entry(status).or_insert(0) += 1;
        }
        assert_eq!(
            statuses,
            std::collections::BTreeMap::from([("401".to_string(), 30)]),
            "{protocol}"
        );
    }
}
