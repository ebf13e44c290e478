//! A stand-in for the Kubernetes API server, over TLS with the test CA: it
//! checks the bearer token; serves the scale subresource, keeping each
//! workload's replica count and reporting every change so that a test can
//! start or stop replicas as the kubelet would; and answers TokenReviews
//! for the service-account tokens a test made (`pod_token`) and GETs of the
//! pods a test added (`add_pod`).

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
    state: Arc<State>,
    cancel: CancellationToken,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What the stand-in knows a service-account token to be.
#[derive(Debug, Clone)]
struct TokenFacts {
    namespace: String,
    pod: String,
    uid: String,
    audience: String,
}

struct State {
    token: String,
    tokens: Mutex<HashMap<String, TokenFacts>>,
    pods: Mutex<HashMap<String, Value>>,
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
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && request.method() == Method::POST {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<&str> = review["spec"]["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let facts = state.tokens.lock().unwrap().get(token).cloned();
        let status = match facts {
            Some(facts) if wanted.contains(&facts.audience.as_str()) => json!({
                "authenticated": true,
                "audiences": [facts.audience],
                "user": {
                    "username": format!("system:serviceaccount:{}:infermesh", facts.namespace),
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [facts.pod],
                        "authentication.kubernetes.io/pod-uid": [facts.uid],
                    },
                },
            }),
            Some(_) => json!({"authenticated": false, "error": "token audiences do not match"}),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        return answer(
            StatusCode::CREATED,
            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "status": status}),
        );
    }
    if let Some(pod) = path.strip_prefix("/api/v1/namespaces/") {
        let pod = state.pods.lock().unwrap().get(pod).cloned();
        return match pod {
            Some(pod) => answer(StatusCode::OK, pod),
            None => answer(
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "message": "pods not found"}),
            ),
        };
    }
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
            tokens: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            replicas: Mutex::new(HashMap::new()),
            changes: tx,
            refused: refused.clone(),
        });
        let stop = cancel.clone();
        let served = state.clone();
        tokio::spawn(async move {
            let state = served;
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
            state,
            cancel,
        }
    }

    /// Adds pod `namespace/name` with `uid` and `annotations`.
    pub fn add_pod(&self, namespace: &str, name: &str, uid: &str, annotations: Value) {
        let pod = json!({"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": annotations}});
        self.state
            .pods
            .lock()
            .unwrap()
            .insert(format!("{namespace}/pods/{name}"), pod);
    }

    /// Removes pod `namespace/name`.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.state
            .pods
            .lock()
            .unwrap()
            .remove(&format!("{namespace}/pods/{name}"));
    }

    /// A projected service-account token of pod `namespace/pod` (`uid`)
    /// for `audience`, written to `DIR/<file>`; returns the file.
    pub fn pod_token(
        &self,
        dir: &std::path::Path,
        namespace: &str,
        pod: &str,
        uid: &str,
        audience: &str,
    ) -> PathBuf {
        let token = format!("sa-token-{namespace}-{pod}-{audience}-{}", rand_suffix());
        self.state.tokens.lock().unwrap().insert(
            token.clone(),
            TokenFacts {
                namespace: namespace.into(),
                pod: pod.into(),
                uid: uid.into(),
                audience: audience.into(),
            },
        );
        let path = dir.join(format!("sa-token-{namespace}-{pod}-{audience}"));
        std::fs::write(&path, token).expect("token file");
        path
    }

    /// Control-plane flags that make it review tokens through this server.
    pub fn token_review_flags(&self) -> Vec<String> {
        let mut flags = vec!["--kubernetes-token-review".to_string()];
        flags.extend(self.api_flags());
        flags
    }

    /// Where the API server is and how to trust and call it.
    fn api_flags(&self) -> Vec<String> {
        vec![
            "--kubernetes-api".into(),
            self.url.clone(),
            "--kubernetes-token-file".into(),
            self.token_file.display().to_string(),
            "--kubernetes-ca".into(),
            self.ca_file.display().to_string(),
        ]
    }

    /// Control-plane flags that make it scale through this server.
    pub fn control_plane_flags(&self) -> Vec<String> {
        let mut flags = vec!["--scale-actuator".to_string(), "kubernetes".into()];
        flags.extend(self.api_flags());
        flags
    }
}

/// A few random hex digits, so that tokens of different tests differ.
fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:08x}")
}
