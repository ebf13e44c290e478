//! TLS end to end on loopback with certificates made at run time: HTTPS via
//! `http::serve` with TLS (h2 and HTTP/1.1 by ALPN, refused handshakes, handshake
//! deadline, reload from disk, mTLS identities in request extensions) and
//! tonic gRPC with `tonic_server_config` / `client_config` reading the
//! caller's identity.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use infermesh_runtime::http::{RequestBody, ServeOptions, full, serve};
use infermesh_runtime::tls::pki::{IssuedCert, LocalCa};
use infermesh_runtime::tls::server::{
    ALPN_H2, ALPN_HTTP1, CertWatcher, HTTP_ALPN, ReloadingCertResolver,
};
use infermesh_runtime::tls::{
    ClientAuth, PeerIdentity, PeerRole, client_config, load_certs, load_private_key, peer_identity,
    provider, root_store, server_config, tonic_server_config,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const DEADLINE: Duration = Duration::from_secs(10);
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A CA and a server certificate for localhost written to a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: LocalCa,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca: LocalCa::generate().unwrap(),
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.cert_pem()).unwrap();
        pki.server_cert(&["localhost"])
            .write(&pki.path("server.pem"), &pki.path("server-key.pem"))
            .unwrap();
        pki
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn server_cert(&self, names: &[&str]) -> IssuedCert {
        self.ca
            .issue_server(names, &["127.0.0.1".parse().unwrap()])
            .unwrap()
    }
    /// A client trusting this CA, without a certificate.
    fn anonymous(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_tls(&self.path("ca.pem"), None, alpn)
    }
    /// A client trusting this CA, presenting `(cert, key)`.
    fn as_peer(
        &self,
        (cert, key): &(PathBuf, PathBuf),
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        client_tls(&self.path("ca.pem"), Some((cert, key)), alpn)
    }
    /// Issues and writes a client certificate for `role`/`name`.
    fn client(&self, role: PeerRole, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.path(&format!("{role}-{name}.pem")),
            self.path(&format!("{role}-{name}-key.pem")),
        );
        self.ca
            .issue_client(&PeerIdentity::new(role, name).unwrap())
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        (cert, key)
    }
}

/// A `http::serve` with TLS listener whose handler answers "<version> <identity URI or anonymous>".
struct Https {
    addr: SocketAddr,
    resolver: Arc<ReloadingCertResolver>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    _watcher: CertWatcher,
}

async fn start_https(pki: &Pki, client_auth: ClientAuth) -> Https {
    let cancel = CancellationToken::new();
    let ca = pki.path("ca.pem");
    let tls = server_config(
        &pki.path("server.pem"),
        &pki.path("server-key.pem"),
        Some(&ca),
        client_auth,
        HTTP_ALPN,
        Duration::from_millis(20),
        cancel.clone(),
    )
    .unwrap();
    let acceptor = tls.acceptor();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = tower::service_fn(|request: http::Request<RequestBody>| async move {
        let who = request.extensions().get::<PeerIdentity>();
        let who = who.map_or("anonymous".into(), PeerIdentity::uri);
        let body = full(format!("{:?} {who}", request.version()));
        Ok::<_, Infallible>(http::Response::new(body))
    });
    let options = ServeOptions {
        header_read_timeout: Duration::from_secs(1),
        tls: Some(acceptor),
        ..ServeOptions::plaintext(Duration::from_secs(5))
    };
    let task = tokio::spawn(serve(listener, service, cancel.clone(), options));
    Https {
        addr,
        resolver: tls.resolver,
        cancel,
        task,
        _watcher: tls.watcher,
    }
}

/// A client config trusting `ca`, presenting `identity` (cert, key) if given, offering `alpn`.
fn client_tls(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(root_store(ca).unwrap());
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert).unwrap(), load_private_key(key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

impl Https {
    /// The body of GET / over a fresh connection with `client`.
    async fn get(&self, client: Arc<rustls::ClientConfig>) -> String {
        self.try_get(client).await.unwrap()
    }

    async fn try_get(&self, client: Arc<rustls::ClientConfig>) -> Result<String, BoxError> {
        let round_trip = async {
            let stream = tls_connect(self.addr, client).await?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            let io = TokioIo::new(stream);
            let request = http::Request::get("https://localhost/").body(Empty::<Bytes>::new())?;
            let response = if h2 {
                let (mut send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                send.send_request(request).await?
            } else {
                let (mut send, conn) = http1::handshake(io).await?;
                tokio::spawn(conn);
                send.send_request(request).await?
            };
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(String::from_utf8(body.to_vec())?)
        };
        tokio::time::timeout(DEADLINE, round_trip).await?
    }

    /// The end-entity certificate the server presents now.
    async fn served_cert(&self, ca: &Path) -> CertificateDer<'static> {
        let stream = tls_connect(self.addr, client_tls(ca, None, &[]))
            .await
            .unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    }
}

/// Polls `condition` until it holds, failing the test after `DEADLINE`.
async fn eventually<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn https_speaks_h2_or_http1_by_alpn_and_outlives_a_client_that_distrusts_it() {
    let pki = Pki::new();
    let server = start_https(&pki, ClientAuth::None).await;
    assert_eq!(
        server.get(pki.anonymous(&[ALPN_H2])).await,
        "HTTP/2.0 anonymous"
    );
    assert_eq!(
        server.get(pki.anonymous(&[ALPN_HTTP1])).await,
        "HTTP/1.1 anonymous"
    );
    assert_eq!(server.get(pki.anonymous(&[])).await, "HTTP/1.1 anonymous");

    let other_ca = pki.path("other-ca.pem");
    std::fs::write(&other_ca, LocalCa::generate().unwrap().cert_pem()).unwrap();
    let distrusting = client_tls(&other_ca, None, HTTP_ALPN);
    assert!(
        tls_connect(server.addr, distrusting).await.is_err(),
        "handshake succeeded"
    );
    assert_eq!(
        server.get(pki.anonymous(HTTP_ALPN)).await,
        "HTTP/2.0 anonymous"
    );

    server.cancel.cancel();
    let stopped = tokio::time::timeout(DEADLINE, server.task).await;
    stopped.expect("server drains and stops").unwrap();
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped_and_others_are_served() {
    let pki = Pki::new();
    let server = start_https(&pki, ClientAuth::None).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(
        server.get(pki.anonymous(&[ALPN_H2])).await,
        "HTTP/2.0 anonymous"
    );
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut buf)).await;
    let read = read.expect("server closes the silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "still open: {read:?}");
}

#[tokio::test]
async fn a_reissued_certificate_is_served_without_restart_and_garbage_is_ignored() {
    let pki = Pki::new();
    let server = start_https(&pki, ClientAuth::None).await;
    let ca = pki.path("ca.pem");
    let original = server.served_cert(&ca).await;

    let reissued = pki.server_cert(&["localhost", "reloaded.infermesh.test"]);
    let (cert, key) = (pki.path("server.pem"), pki.path("server-key.pem"));
    reissued.write(&cert, &key).unwrap();
    let expected = der(&reissued.cert_pem);
    assert_ne!(expected, original);
    eventually("the reissued certificate is served", || async {
        server.served_cert(&ca).await == expected
    })
    .await;

    let rejected_before = server.resolver.rejections();
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    eventually("the garbage is refused", || async {
        server.resolver.rejections() > rejected_before
    })
    .await;
    assert_eq!(server.served_cert(&ca).await, expected);
    assert_eq!(
        server.get(pki.anonymous(HTTP_ALPN)).await,
        "HTTP/2.0 anonymous"
    );
}

#[tokio::test]
async fn required_mtls_refuses_anonymous_clients_and_hands_handlers_the_edge_identity() {
    let pki = Pki::new();
    let server = start_https(&pki, ClientAuth::Required).await;
    let refused = server.try_get(pki.anonymous(HTTP_ALPN)).await;
    assert!(refused.is_err(), "anonymous client served: {refused:?}");

    let (foreign_cert, foreign_key) = (pki.path("foreign.pem"), pki.path("foreign-key.pem"));
    let edge = PeerIdentity::new(PeerRole::Edge, "eu-west-1").unwrap();
    let stranger = LocalCa::generate().unwrap();
    let issued = stranger.issue_client(&edge).unwrap();
    issued.write(&foreign_cert, &foreign_key).unwrap();
    let foreign = client_tls(
        &pki.path("ca.pem"),
        Some((&foreign_cert, &foreign_key)),
        HTTP_ALPN,
    );
    assert!(
        server.try_get(foreign).await.is_err(),
        "foreign client cert accepted"
    );

    let edge_cert = pki.client(PeerRole::Edge, "eu-west-1");
    for alpn in [ALPN_H2, ALPN_HTTP1] {
        let body = server.get(pki.as_peer(&edge_cert, &[alpn])).await;
        let seen: PeerIdentity = body.split_once(' ').unwrap().1.parse().unwrap();
        let name = "eu-west-1".to_owned();
        assert_eq!(
            seen,
            PeerIdentity {
                role: PeerRole::Edge,
                name,
                scope: None,
            }
        );
    }
}

#[tokio::test]
async fn optional_mtls_serves_anonymous_clients_without_an_identity() {
    let pki = Pki::new();
    let server = start_https(&pki, ClientAuth::Optional).await;
    assert_eq!(
        server.get(pki.anonymous(&[ALPN_H2])).await,
        "HTTP/2.0 anonymous"
    );
    let sidecar = pki.client(PeerRole::Sidecar, "llama-0");
    let body = server.get(pki.as_peer(&sidecar, &[ALPN_H2])).await;
    assert_eq!(body, "HTTP/2.0 spiffe://infermesh/sidecar/llama-0");
}

/// A health service that answers only callers with an identity, echoing it in `x-peer-identity`.
struct IdentityEcho;

#[tonic::async_trait]
impl Health for IdentityEcho {
    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn check(&self, request: Request<HealthCheckRequest>) -> GrpcResult<HealthCheckResponse> {
        let identity = peer_identity(&request).ok_or(Status::unauthenticated("no identity"))?;
        let status = ServingStatus::Serving as i32;
        let mut response = Response::new(HealthCheckResponse { status });
        let uri = identity.uri().parse().unwrap();
        response.metadata_mut().insert("x-peer-identity", uri);
        Ok(response)
    }

    async fn watch(&self, _: Request<HealthCheckRequest>) -> GrpcResult<Self::WatchStream> {
        Err(Status::unimplemented("watch"))
    }
}

type GrpcResult<T> = Result<Response<T>, Status>;

/// A tonic server with `tonic_server_config`; client certificates optional or required.
async fn start_grpc(pki: &Pki, client_auth_optional: bool) -> (SocketAddr, CancellationToken) {
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server-key.pem"),
        pki.path("ca.pem"),
    );
    let tls = tonic_server_config(&cert, &key, Some(&ca), client_auth_optional).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(HealthServer::new(IdentityEcho))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            cancel.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    (addr, cancel)
}

/// One health check over a fresh channel configured by `client_config`.
async fn grpc_check(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Response<HealthCheckResponse>, BoxError> {
    let call = async {
        let endpoint = Channel::from_shared(format!("https://{addr}"))?.tls_config(tls)?;
        let mut client = HealthClient::new(endpoint.connect().await?);
        Ok::<_, BoxError>(client.check(HealthCheckRequest::default()).await?)
    };
    tokio::time::timeout(DEADLINE, call).await?
}

#[tokio::test]
async fn grpc_over_mtls_shows_the_service_who_called() {
    let pki = Pki::new();
    let (addr, cancel) = start_grpc(&pki, true).await;
    let ca = pki.path("ca.pem");
    let (cert, key) = pki.client(PeerRole::Edge, "us-east-2");

    let tls = client_config(&ca, Some((&cert, &key))).unwrap();
    let response = grpc_check(addr, tls).await.unwrap();
    assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);
    let uri = response.metadata().get("x-peer-identity").unwrap();
    let seen: PeerIdentity = uri.to_str().unwrap().parse().unwrap();
    let name = "us-east-2".to_owned();
    assert_eq!(
        seen,
        PeerIdentity {
            role: PeerRole::Edge,
            name,
            scope: None,
        }
    );

    let anonymous = grpc_check(addr, client_config(&ca, None).unwrap()).await;
    let error = anonymous.unwrap_err();
    let status = error.downcast_ref::<Status>().expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    cancel.cancel();
}

#[tokio::test]
async fn grpc_with_required_client_certificates_refuses_an_anonymous_caller() {
    let pki = Pki::new();
    let (addr, cancel) = start_grpc(&pki, false).await;
    let ca = pki.path("ca.pem");
    let anonymous = grpc_check(addr, client_config(&ca, None).unwrap()).await;
    assert!(anonymous.is_err(), "anonymous caller served");
    let (cert, key) = pki.client(PeerRole::Admin, "admin");
    let admin = grpc_check(addr, client_config(&ca, Some((&cert, &key))).unwrap()).await;
    assert!(admin.is_ok(), "{admin:?}");
    cancel.cancel();
}

#[tokio::test]
async fn a_control_plane_client_presents_a_renewed_certificate_from_its_next_connection() {
    use infermesh_runtime::control_plane::ControlPlaneTlsArgs;
    let pki = Pki::new();
    let (addr, cancel) = start_grpc(&pki, false).await;
    let (cert, key) = (pki.path("mine.pem"), pki.path("mine-key.pem"));
    let issue = |name: &str| {
        pki.ca
            .issue_client(&PeerIdentity::new(PeerRole::Edge, name).unwrap())
            .unwrap()
            .write(&cert, &key)
            .unwrap();
    };
    issue("first");
    let client = ControlPlaneTlsArgs {
        control_plane_ca: Some(pki.path("ca.pem")),
        control_plane_cert: Some(cert.clone()),
        control_plane_key: Some(key.clone()),
    }
    .client()
    .unwrap();
    let seen = |client: infermesh_runtime::control_plane::ControlPlaneClient| async move {
        let channel = client
            .connect(&addr.to_string(), DEADLINE)
            .await
            .expect("connects");
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .expect("health check");
        response
            .metadata()
            .get("x-peer-identity")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(seen(client.clone()).await, "spiffe://infermesh/edge/first");
    // The files are replaced as a renewal does (atomically); the same
    // client, with no restart, presents the new certificate next time.
    issue("second");
    assert_eq!(seen(client.clone()).await, "spiffe://infermesh/edge/second");
    // A broken file is an error at connect, not a silent fallback.
    std::fs::write(&cert, b"not a certificate").unwrap();
    let error = client
        .connect(&addr.to_string(), DEADLINE)
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    cancel.cancel();
}
