//! A stand-in for the Kubernetes API server's scale subresource, over TLS
//! with the test CA: it checks the bearer token, keeps each workload's
//! replica count, and reports every change so that a test can start or
//! stop replicas as the kubelet would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use infermesh_runtime::tls::{ClientAuth, server_config};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pki::TestPki;

/// A scale change the API server accepted: workload path and replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleChange {
    /// `namespaces/<ns>/deployments/<name>`.
    pub workload: String,
    /// The new spec.replicas.
    pub replicas: u32,
}

/// The running stand-in; stops when dropped.
pub struct FakeKube {
    /// `https://localhost:<port>`.
    pub url: String,
    /// The service-account token file the control plane must send.
    pub token_file: PathBuf,
    /// The CA the server's certificate chains to.
    pub ca_file: PathBuf,
    /// Accepted changes, in order.
    pub changes: mpsc::UnboundedReceiver<ScaleChange>,
    /// Requests refused for a missing or wrong token.
    pub refused: Arc<Mutex<u32>>,
    cancel: CancellationToken,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct State {
    token: String,
    replicas: Mutex<HashMap<String, u32>>,
    changes: mpsc::UnboundedSender<ScaleChange>,
    refused: Arc<Mutex<u32>>,
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let expected = format!("Bearer {}", state.token);
    if request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        *state.refused.lock().unwrap() += 1;
        return answer(
            StatusCode::UNAUTHORIZED,
            json!({"kind": "Status", "message": "Unauthorized"}),
        );
    }
    let path = request.uri().path().to_string();
    let Some(workload) = path
        .strip_prefix("/apis/apps/v1/")
        .and_then(|p| p.strip_suffix("/scale"))
        .map(String::from)
    else {
        return answer(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "message": "not found"}),
        );
    };
    let method = request.method().clone();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut replicas = state.replicas.lock().unwrap();
    if method == Method::PATCH {
        if content_type != "application/merge-patch+json" {
            return answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"kind": "Status", "message": format!("content type {content_type:?}")}),
            );
        }
        let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
        let Some(count) = patch["spec"]["replicas"].as_u64() else {
            return answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"kind": "Status", "message": "spec.replicas missing"}),
            );
        };
        replicas.insert(workload.clone(), count as u32);
        let _ = state.changes.send(ScaleChange {
            workload: workload.clone(),
            replicas: count as u32,
        });
    } else if method != Method::GET {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"kind": "Status", "message": "method not allowed"}),
        );
    }
    let count = replicas.get(&workload).copied().unwrap_or(0);
    answer(
        StatusCode::OK,
        json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
               "spec": {"replicas": count}, "status": {"replicas": count}}),
    )
}

impl FakeKube {
    /// Serves on a free loopback port with a certificate from its own CA,
    /// keeping its files under `dir`.
    pub async fn start(dir: &std::path::Path) -> Self {
        let pki = TestPki::create(&dir.join("kube-pki"));
        let cancel = CancellationToken::new();
        let tls = server_config(
            &pki.server.cert,
            &pki.server.key,
            None,
            ClientAuth::None,
            &[b"http/1.1"],
            Duration::from_secs(60),
            cancel.clone(),
        )
        .expect("kube TLS config");
        let acceptor = tls.acceptor();
        let token_file = dir.join("kube-token");
        let token = "service-account-token-for-tests";
        std::fs::write(&token_file, format!("{token}\n")).expect("token file");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (tx, changes) = mpsc::unbounded_channel();
        let refused = Arc::new(Mutex::new(0));
        let state = Arc::new(State {
            token: token.to_string(),
            replicas: Mutex::new(HashMap::new()),
            changes: tx,
            refused: refused.clone(),
        });
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _tls = tls;
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |r| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(state, r).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://localhost:{port}"),
            ca_file: pki.ca_cert.clone(),
            token_file,
            changes,
            refused,
            cancel,
        }
    }

    /// Control-plane flags that make it scale through this server.
    pub fn control_plane_flags(&self) -> Vec<String> {
        vec![
            "--scale-actuator".into(),
            "kubernetes".into(),
            "--kubernetes-api".into(),
            self.url.clone(),
            "--kubernetes-token-file".into(),
            self.token_file.display().to_string(),
            "--kubernetes-ca".into(),
            self.ca_file.display().to_string(),
        ]
    }
}
