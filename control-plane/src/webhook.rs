//! The mutating admission webhook that injects the sidecar into inference
//! pods. Kubernetes sends an `AdmissionReview` (admission.k8s.io/v1) for
//! pods labelled `infermesh.io/inject: "true"`; the answer adds the
//! `infermesh-sidecar` container (ports, environment from the pod's
//! `infermesh.io/*` annotations, probes, resources, a locked-down security
//! context, a preStop hook) and, with TLS to the control plane, the volume
//! holding its client certificate; every other container gets a preStop
//! hook that waits for the sidecar's drain. A pod that already has the sidecar is left as it is;
//! a labelled pod without the annotations the sidecar needs is refused with
//! a message naming them. Served over HTTPS (`POST /mutate`).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use infermesh_runtime::http::RequestBody;
use infermesh_runtime::http::{Body, ServeOptions, full};
use infermesh_runtime::tls::{self, ClientAuth, server::HTTP_ALPN};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Name of the injected container.
pub const CONTAINER: &str = "infermesh-sidecar";
/// Label a pod carries to be injected.
pub const INJECT_LABEL: &str = "infermesh.io/inject";
/// Annotation prefix of the per-pod settings.
pub const PREFIX: &str = "infermesh.io/";
const TLS_VOLUME: &str = "infermesh-control-plane-tls";
const TLS_MOUNT: &str = "/etc/infermesh/control-plane-tls";
/// The volume every container of the pod shares with the sidecar for the
/// preStop hand-shake: the hook's unix socket and the `drained` marker.
const RUN_VOLUME: &str = "infermesh-run";
const RUN_MOUNT: &str = "/var/run/infermesh";
const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;

/// Why a labelled pod cannot be injected; the text is the refusal the
/// API server shows whoever created the pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectionError {
    /// The pod object has no containers list.
    #[error("the pod has no spec.containers")]
    NoContainers,
    /// Annotations the sidecar needs are absent or empty.
    #[error("pods labelled {}=true need the annotations {}", INJECT_LABEL, .names.join(", "))]
    MissingAnnotations {
        /// The full annotation names missing.
        names: Vec<String>,
    },
    /// The engine annotation names an engine the sidecar does not know.
    #[error("{}engine: {engine:?} is not vllm or sglang", PREFIX)]
    UnknownEngine {
        /// The value given.
        engine: String,
    },
    /// The engine-port annotation is not a port number.
    #[error("{}engine-port: {port:?} is not a port number", PREFIX)]
    BadEnginePort {
        /// The value given.
        port: String,
    },
    /// The max-adapters annotation is not a positive number.
    #[error("{}max-adapters: {value:?} is not a positive number", PREFIX)]
    BadMaxAdapters {
        /// The value given.
        value: String,
    },
    /// A container of the pod already uses a port the sidecar needs.
    #[error("port {port} is taken by another container; the sidecar needs it")]
    PortTaken {
        /// The port.
        port: u16,
    },
    /// The pod already has a volume of the name the sidecar adds.
    #[error("the pod already has a volume named {name}")]
    VolumeExists {
        /// The volume name.
        name: String,
    },
}

/// What the injected container looks like.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Image of the sidecar.
    pub image: String,
    /// `host:port` the sidecars dial.
    pub control_plane: String,
    /// Secret with the sidecars' client certificate (tls.crt, tls.key,
    /// ca.crt), in the pod's namespace; `None` for a plaintext control plane.
    pub tls_secret: Option<String>,
    /// Port the sidecar's proxy listens on.
    pub proxy_port: u16,
    /// Port of the sidecar's metrics.
    pub metrics_port: u16,
    /// Each sidecar gets its own identity from the control plane for its
    /// pod's service-account token (a projected token, audience
    /// `audience`), and edges reach it over mutual TLS; only `ca.crt` of
    /// `tls_secret` is used. Otherwise the secret's shared certificate is
    /// mounted and the sidecar serves plain HTTP.
    pub issued_identities: Option<IssuedIdentities>,
}

/// How injected sidecars get issued identities.
#[derive(Debug, Clone)]
pub struct IssuedIdentities {
    /// Audience of the projected service-account token.
    pub audience: String,
}

const TOKEN_VOLUME: &str = "infermesh-token";
const TOKEN_MOUNT: &str = "/var/run/secrets/infermesh";

/// The AdmissionReview answering `review`.
pub fn answer(review: &Value, injection: &Injection) -> Value {
    let uid = review
        .pointer("/request/uid")
        .cloned()
        .unwrap_or(Value::Null);
    let response = match review.pointer("/request/object") {
        None => refuse(&uid, "the review carries no request.object"),
        Some(pod) => match patch(pod, injection) {
            Ok(None) => json!({"uid": uid, "allowed": true}),
            Ok(Some(ops)) => {
                let bytes = serde_json::to_vec(&ops).unwrap_or_default();
                json!({
                    "uid": uid,
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
                })
            }
            Err(error) => refuse(&uid, &error.to_string()),
        },
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn refuse(uid: &Value, message: &str) -> Value {
    json!({"uid": uid, "allowed": false, "status": {"code": 400, "message": message}})
}

/// The JSON patch injecting the sidecar into `pod`; `None` when nothing is
/// to change (not labelled, or already injected).
pub fn patch(pod: &Value, injection: &Injection) -> Result<Option<Vec<Value>>, InjectionError> {
    let labelled = pod
        .pointer("/metadata/labels")
        .and_then(|l| l.get(INJECT_LABEL))
        .and_then(Value::as_str)
        == Some("true");
    if !labelled {
        return Ok(None);
    }
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .ok_or(InjectionError::NoContainers)?;
    if containers
        .iter()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER))
    {
        return Ok(None);
    }
    let annotations = pod.pointer("/metadata/annotations");
    let annotation = |name: &str| {
        annotations
            .and_then(|a| a.get(format!("{PREFIX}{name}")))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let missing: Vec<String> = ["model", "pool", "region"]
        .iter()
        .filter(|name| annotation(name).is_none())
        .map(|name| format!("{PREFIX}{name}"))
        .collect();
    if !missing.is_empty() {
        return Err(InjectionError::MissingAnnotations { names: missing });
    }
    let engine = annotation("engine").unwrap_or("vllm");
    if !matches!(engine, "vllm" | "sglang") {
        return Err(InjectionError::UnknownEngine {
            engine: engine.to_string(),
        });
    }
    let engine_port = annotation("engine-port").unwrap_or("8000");
    if engine_port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(InjectionError::BadEnginePort {
            port: engine_port.to_string(),
        });
    }
    if let Some(max) = annotation("max-adapters")
        && max.parse::<u32>().map_or(true, |n| n == 0)
    {
        return Err(InjectionError::BadMaxAdapters {
            value: max.to_string(),
        });
    }
    for port in [injection.proxy_port, injection.metrics_port] {
        let taken = containers.iter().any(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .is_some_and(|ports| {
                    ports.iter().any(|p| {
                        p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(port))
                    })
                })
        });
        if taken {
            return Err(InjectionError::PortTaken { port });
        }
    }

    let value = |name: &str, value: &str| json!({"name": name, "value": value});
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        value(
            "INFERMESH_LISTEN",
            &format!("0.0.0.0:{}", injection.proxy_port),
        ),
        value(
            "INFERMESH_METRICS_LISTEN",
            &format!("0.0.0.0:{}", injection.metrics_port),
        ),
        value(
            "INFERMESH_ENGINE_URL",
            &format!("http://127.0.0.1:{engine_port}"),
        ),
        value("INFERMESH_ENGINE", engine),
        value("INFERMESH_MODEL", annotation("model").unwrap_or_default()),
        value("INFERMESH_POOL", annotation("pool").unwrap_or_default()),
        value("INFERMESH_REGION", annotation("region").unwrap_or_default()),
        value("INFERMESH_CONTROL_PLANE", &injection.control_plane),
        field("POD_IP", "status.podIP"),
        field("INFERMESH_ENDPOINT_ID", "metadata.name"),
    ];
    if let Some(zone) = annotation("zone") {
        env.push(value("INFERMESH_ZONE", zone));
    }
    if let Some(revision) = annotation("model-revision") {
        env.push(value("INFERMESH_MODEL_REVISION", revision));
    }
    if let Some(max) = annotation("max-adapters") {
        env.push(value("INFERMESH_MAX_ADAPTERS", max));
    }
    let mut container = json!({
        "name": CONTAINER,
        "image": injection.image,
        "command": ["infermesh-sidecar"],
        "env": env,
        "ports": [
            {"name": "infermesh-proxy", "containerPort": injection.proxy_port, "protocol": "TCP"},
            {"name": "infermesh-metrics", "containerPort": injection.metrics_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": injection.proxy_port},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": injection.proxy_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    let mut ops = Vec::new();
    let mut volumes =
        vec![json!({"name": RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})];
    let mut mounts = vec![json!({"name": RUN_VOLUME, "mountPath": RUN_MOUNT})];
    if let Some(env) = container["env"].as_array_mut() {
        env.push(value(
            "INFERMESH_PRESTOP_SOCKET",
            &format!("{RUN_MOUNT}/prestop.sock"),
        ));
    }
    match &injection.issued_identities {
        Some(issued) => {
            // The pod's own projected token gets the sidecar a certificate
            // naming its endpoint (the pod), kept in the run volume.
            if let Some(env) = container["env"].as_array_mut() {
                env.push(value("INFERMESH_SERVE_TLS", "mutual"));
                env.push(value(
                    "INFERMESH_IDENTITY_DIR",
                    &format!("{RUN_MOUNT}/identity"),
                ));
                env.push(value(
                    "INFERMESH_SERVICE_ACCOUNT_TOKEN_FILE",
                    &format!("{TOKEN_MOUNT}/token"),
                ));
            }
            mounts.push(json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": true}));
            volumes.push(json!({"name": TOKEN_VOLUME, "projected": {"sources": [
                {"serviceAccountToken": {"audience": issued.audience, "expirationSeconds": 3600, "path": "token"}},
            ]}}));
            for probe in ["readinessProbe", "livenessProbe"] {
                container[probe]["httpGet"]["scheme"] = json!("HTTPS");
            }
        }
        None => {
            // The injected certificate is shared by every pod, so it cannot
            // name each pod's endpoint as the edges' mutual TLS requires;
            // the port is kept to edges by the chart's NetworkPolicy instead.
            if let Some(env) = container["env"].as_array_mut() {
                env.push(value("INFERMESH_SERVE_TLS", "off"));
            }
        }
    }
    if let Some(secret) = &injection.tls_secret {
        if let Some(env) = container["env"].as_array_mut() {
            env.push(value(
                "INFERMESH_CONTROL_PLANE_CA",
                &format!("{TLS_MOUNT}/ca.crt"),
            ));
            if injection.issued_identities.is_none() {
                for (name, file) in [
                    ("INFERMESH_CONTROL_PLANE_CERT", "tls.crt"),
                    ("INFERMESH_CONTROL_PLANE_KEY", "tls.key"),
                ] {
                    env.push(value(name, &format!("{TLS_MOUNT}/{file}")));
                }
            }
        }
        mounts.push(json!({"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": true}));
        volumes.push(json!({"name": TLS_VOLUME, "secret": {"secretName": secret}}));
    }
    container["volumeMounts"] = Value::Array(mounts);
    match pod.pointer("/spec/volumes").and_then(Value::as_array) {
        Some(existing) => {
            for volume in volumes {
                let name = volume["name"].as_str().unwrap_or_default();
                if existing
                    .iter()
                    .any(|v| v.get("name").and_then(Value::as_str) == Some(name))
                {
                    return Err(InjectionError::VolumeExists {
                        name: name.to_string(),
                    });
                }
                ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
            }
        }
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes})),
    }
    // Every container's preStop waits for the sidecar's drain, so that the
    // engine gets SIGTERM only once its last request has finished; a
    // container's own preStop hook is left as it is. The hooks reach the
    // sidecar through the shared volume, never over the network: the
    // sidecar's port refuses /prestop. Containers other than the sidecar
    // have no infermesh binary, so they wait for the `drained` marker (or
    // for the socket to go, if the sidecar is gone).
    let wait = format!(
        "while [ -S {RUN_MOUNT}/prestop.sock ] && [ ! -e {RUN_MOUNT}/drained ]; do sleep 1; done"
    );
    let hook = json!({"exec": {"command": ["/bin/sh", "-c", wait]}});
    for (i, c) in containers.iter().enumerate() {
        let mount = json!({"name": RUN_VOLUME, "mountPath": RUN_MOUNT, "readOnly": true});
        match c.get("volumeMounts").and_then(Value::as_array) {
            Some(_) => ops.push(json!({
                "op": "add",
                "path": format!("/spec/containers/{i}/volumeMounts/-"),
                "value": mount,
            })),
            None => ops.push(json!({
                "op": "add",
                "path": format!("/spec/containers/{i}/volumeMounts"),
                "value": [mount],
            })),
        }
        match c.get("lifecycle") {
            None => ops.push(json!({
                "op": "add",
                "path": format!("/spec/containers/{i}/lifecycle"),
                "value": {"preStop": hook},
            })),
            Some(lifecycle) if lifecycle.get("preStop").is_none() => ops.push(json!({
                "op": "add",
                "path": format!("/spec/containers/{i}/lifecycle/preStop"),
                "value": hook,
            })),
            Some(_) => {}
        }
    }
    let own_hook = json!({"exec": {"command": [
        "infermesh-sidecar", "--prestop-hook", format!("{RUN_MOUNT}/prestop.sock"),
    ]}});
    container["lifecycle"] = json!({"preStop": own_hook});
    ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": container}));
    ops.push(json!({
        "op": "add",
        "path": "/metadata/annotations/infermesh.io~1injected",
        "value": "true",
    }));
    Ok(Some(ops))
}

/// Where and how the webhook is served.
#[derive(Debug, Clone)]
pub struct WebhookServer {
    /// Listen address.
    pub listen: std::net::SocketAddr,
    /// Serving certificate (reloaded when it changes).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// What to inject.
    pub injection: Injection,
}

/// Loads the certificate and binds the listener (errors here stop the
/// control plane at start), then serves the webhook until `cancel` fires.
pub async fn start(
    server: WebhookServer,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let tls = tls::server_config(
        &server.cert,
        &server.key,
        None,
        ClientAuth::None,
        HTTP_ALPN,
        tls::server::DEFAULT_RELOAD_INTERVAL,
        cancel.child_token(),
    )
    .map_err(|e| anyhow::anyhow!("--webhook-tls-cert/--webhook-tls-key: {e}"))?;
    let listener = tokio::net::TcpListener::bind(server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--webhook-listen {}: {e}", server.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "sidecar-injection webhook serving on /mutate");
    let injection = Arc::new(server.injection);
    let service = tower::service_fn(move |request: Request<RequestBody>| {
        let injection = injection.clone();
        async move { Ok::<_, Infallible>(handle(request, &injection).await) }
    });
    let options = ServeOptions {
        tls: Some(tls.acceptor()),
        ..ServeOptions::plaintext(Duration::from_secs(10))
    };
    Ok(tokio::spawn(async move {
        infermesh_runtime::http::serve(listener, service, cancel, options).await;
        tls.watcher.stop().await;
    }))
}

async fn handle(request: Request<RequestBody>, injection: &Injection) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => {
            reply(StatusCode::OK, Bytes::from_static(b"ok\n"), "text/plain")
        }
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        Bytes::from(format!("could not read the review: {error}\n")),
                        "text/plain",
                    );
                }
            };
            let review: Value = match serde_json::from_slice(&body) {
                Ok(review) => review,
                Err(error) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        Bytes::from(format!("the body is not an AdmissionReview: {error}\n")),
                        "text/plain",
                    );
                }
            };
            let answered = answer(&review, injection);
            if answered.pointer("/response/allowed") == Some(&Value::Bool(false)) {
                tracing::warn!(reason = ?answered.pointer("/response/status/message"), "pod refused");
            }
            reply(
                StatusCode::OK,
                Bytes::from(answered.to_string()),
                "application/json",
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"POST /mutate or GET /healthz\n"),
            "text/plain",
        ),
    }
}

fn reply(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection(tls: bool) -> Injection {
        Injection {
            image: "ghcr.io/infermesh/infermesh:0.1.0".into(),
            control_plane: "infermesh-control-plane.infermesh.svc:7070".into(),
            tls_secret: tls.then(|| "infermesh-sidecar-tls".into()),
            proxy_port: 8081,
            metrics_port: 9091,
            issued_identities: None,
        }
    }

    #[test]
    fn with_issued_identities_a_sidecar_gets_its_pods_token_and_serves_mutual_tls() {
        let mut issued = injection(true);
        issued.issued_identities = Some(IssuedIdentities {
            audience: "infermesh".into(),
        });
        let ops = patch(&pod(), &issued).unwrap().unwrap();
        let container = ops
            .iter()
            .find(|o| o["path"] == "/spec/containers/-")
            .map(|o| &o["value"])
            .unwrap();
        let env = container["env"].to_string();
        for expected in [
            r#""INFERMESH_SERVE_TLS","value":"mutual""#,
            "INFERMESH_SERVICE_ACCOUNT_TOKEN_FILE",
            "/var/run/infermesh/identity",
            "INFERMESH_CONTROL_PLANE_CA",
        ] {
            assert!(env.contains(expected), "{expected} missing from {env}");
        }
        assert!(!env.contains("INFERMESH_CONTROL_PLANE_CERT"), "{env}");
        assert_eq!(container["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
        let volumes = ops[0]["value"].to_string();
        assert!(
            volumes.contains(r#""audience":"infermesh""#),
            "a projected token for the control plane: {volumes}"
        );
        let shared = Value::Array(patch(&pod(), &injection(true)).unwrap().unwrap()).to_string();
        assert!(shared.contains(r#""INFERMESH_SERVE_TLS","value":"off""#));
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "llama-", "labels": {INJECT_LABEL: "true"},
                "annotations": {"infermesh.io/model": "meta-llama/Llama-3.1-8B-Instruct",
                    "infermesh.io/pool": "llama-8b-eu-west", "infermesh.io/region": "eu-west"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest",
                "ports": [{"containerPort": 8000}]}]}
        })
    }

    #[test]
    fn a_labelled_pod_gets_the_sidecar_and_its_certificate_volume() {
        let ops = patch(&pod(), &injection(true)).unwrap().unwrap();
        let paths: Vec<&str> = ops.iter().filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/spec/volumes",
                "/spec/containers/0/volumeMounts",
                "/spec/containers/0/lifecycle",
                "/spec/containers/-",
                "/metadata/annotations/infermesh.io~1injected"
            ]
        );
        let engine_hook = ops[2]["value"]["preStop"]["exec"]["command"].to_string();
        assert!(
            engine_hook.contains("/var/run/infermesh/drained"),
            "the engine waits for the drain: {engine_hook}"
        );
        assert!(
            !engine_hook.contains("http"),
            "no hook goes over the network"
        );
        let container = &ops[3]["value"];
        assert_eq!(
            container["lifecycle"]["preStop"]["exec"]["command"],
            json!([
                "infermesh-sidecar",
                "--prestop-hook",
                "/var/run/infermesh/prestop.sock"
            ])
        );
        let volumes = ops[0]["value"].to_string();
        assert!(volumes.contains("infermesh-run") && volumes.contains("infermesh-sidecar-tls"));
        let env = container["env"].to_string();
        for expected in [
            "meta-llama/Llama-3.1-8B-Instruct",
            "llama-8b-eu-west",
            "http://127.0.0.1:8000",
            "INFERMESH_CONTROL_PLANE_CERT",
        ] {
            assert!(env.contains(expected), "{expected} missing from {env}");
        }
    }

    #[test]
    fn a_container_keeps_its_own_pre_stop_hook() {
        let mut own = pod();
        own["spec"]["containers"][0]["lifecycle"] =
            json!({"preStop": {"exec": {"command": ["/bin/flush"]}}});
        let mut partial = pod();
        partial["spec"]["containers"][0]["lifecycle"] =
            json!({"postStart": {"exec": {"command": ["/bin/warm"]}}});
        let paths = |ops: Vec<Value>| -> Vec<String> {
            ops.iter()
                .filter_map(|o| o["path"].as_str())
                .filter(|p| p.starts_with("/spec/containers/0"))
                .map(String::from)
                .collect()
        };
        let own_ops = patch(&own, &injection(false)).unwrap().unwrap();
        assert_eq!(
            paths(own_ops),
            ["/spec/containers/0/volumeMounts"],
            "only the shared volume is mounted; the hook is the container's own"
        );
        let partial_ops = patch(&partial, &injection(false)).unwrap().unwrap();
        assert_eq!(
            paths(partial_ops),
            [
                "/spec/containers/0/volumeMounts",
                "/spec/containers/0/lifecycle/preStop"
            ]
        );
    }

    #[test]
    fn other_pods_and_injected_pods_are_left_alone() {
        let mut unlabelled = pod();
        unlabelled["metadata"]["labels"] = json!({});
        assert_eq!(patch(&unlabelled, &injection(false)).unwrap(), None);
        let mut injected = pod();
        injected["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": CONTAINER, "image": "x"}));
        assert_eq!(patch(&injected, &injection(false)).unwrap(), None);
    }

    #[test]
    fn the_resident_adapter_limit_comes_from_its_annotation_and_must_be_a_number() {
        let mut pod = pod();
        pod["metadata"]["annotations"]["infermesh.io/max-adapters"] = json!("16");
        let ops = patch(&pod, &injection(false)).unwrap().unwrap();
        let text = serde_json::to_string(&ops).unwrap();
        assert!(
            text.contains(r#"{"name":"INFERMESH_MAX_ADAPTERS","value":"16"}"#),
            "{text}"
        );
        for bad in ["0", "many", "-1"] {
            pod["metadata"]["annotations"]["infermesh.io/max-adapters"] = json!(bad);
            let refused = patch(&pod, &injection(false)).unwrap_err();
            assert!(refused.to_string().contains("max-adapters"), "{refused}");
        }
    }

    #[test]
    fn a_labelled_pod_missing_annotations_is_refused_by_name() {
        let mut bare = pod();
        bare["metadata"]["annotations"] = json!({"infermesh.io/model": "m"});
        let review = json!({"request": {"uid": "u-1", "object": bare}});
        let answered = answer(&review, &injection(false));
        assert_eq!(answered["response"]["allowed"], false);
        assert_eq!(answered["response"]["uid"], "u-1");
        let message = answered["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("infermesh.io/pool") && message.contains("infermesh.io/region"),
            "{message}"
        );
        let mut clash = pod();
        clash["spec"]["containers"][0]["ports"] = json!([{"containerPort": 8081}]);
        assert!(
            patch(&clash, &injection(false))
                .unwrap_err()
                .to_string()
                .contains("8081")
        );
    }
}
