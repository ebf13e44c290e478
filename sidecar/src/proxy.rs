//! The inbound proxy: every request not meant for the sidecar itself goes
//! to the engine on localhost, bodies streamed both ways (SSE stays
//! chunk-by-chunk). The sidecar answers `/livez` and `/readyz` itself, and
//! refuses `/prestop`: the pod's preStop hooks reach it on a unix socket
//! (`prestop`), never over the network, and the engine's adapter API
//! (`adapters` loads adapters itself). Under mutual TLS (`edges_only`)
//! only callers whose client certificate names an edge get past the
//! probes; anyone else gets 403.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use infermesh_runtime::http::RequestBody;
use infermesh_runtime::http::{Body, Guarded, UpstreamClient, full, streamed, strip_hop_by_hop};
use infermesh_runtime::tls::{PeerIdentity, PeerRole};
use serde_json::json;
use tokio::sync::watch;
use tracing::Instrument;

use crate::metrics::SidecarMetrics;

/// What readiness depends on.
#[derive(Clone)]
pub struct Readiness {
    /// Latest load from the scrape loop, which carries engine health.
    pub loads: watch::Receiver<infermesh_proto::v1::Load>,
    /// True once the pod is stopping.
    pub draining: watch::Receiver<bool>,
    /// Requests being proxied, for the drain.
    pub in_flight: crate::drain::InFlight,
}

/// See the module docs.
#[derive(Clone)]
pub struct EngineProxy {
    client: UpstreamClient,
    engine: Arc<Uri>,
    readiness: Readiness,
    metrics: Option<SidecarMetrics>,
    requests: Arc<std::sync::atomic::AtomicU64>,
    edges_only: bool,
    adapters: Option<Arc<crate::adapters::Adapters>>,
}

impl EngineProxy {
    /// A proxy to the engine at `engine` (scheme and authority).
    pub fn new(client: UpstreamClient, engine: Uri, readiness: Readiness) -> Self {
        Self {
            client,
            engine: Arc::new(engine),
            readiness,
            metrics: None,
            requests: Arc::default(),
            edges_only: false,
            adapters: None,
        }
    }

    /// Loads the adapters requests name (`x-infermesh-adapter`) through `adapters`.
    pub fn with_adapters(mut self, adapters: Arc<crate::adapters::Adapters>) -> Self {
        self.adapters = Some(adapters);
        self
    }

    /// Serves only callers with an edge identity (mutual TLS); probes stay open.
    pub fn edges_only(mut self) -> Self {
        self.edges_only = true;
        self
    }

    /// Counts every proxied request in `requests` (reported as
    /// `Load.requests_total`, how the autoscaler tells an idle pool).
    pub fn counting(mut self, requests: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.requests = requests;
        self
    }

    /// Counts proxied requests in `metrics`.
    pub fn with_metrics(mut self, metrics: SidecarMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Makes the adapter a request names resident, or the answer refusing it.
    async fn adapter_for(
        &self,
        request: &mut Request<RequestBody>,
    ) -> Result<Option<crate::adapters::InUse>, Response<Body>> {
        use crate::adapters::{ADAPTER_HEADER, AdapterError};
        let Some(name) = request.headers_mut().remove(ADAPTER_HEADER) else {
            return Ok(None);
        };
        let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
        let Some(adapters) = &self.adapters else {
            return Err(error(
                StatusCode::NOT_FOUND,
                "this replica serves no adapters",
            ));
        };
        match adapters.acquire(&name).await {
            Ok(in_use) => Ok(Some(in_use)),
            Err(e @ AdapterError::Unknown(_)) => Err(json_response(
                StatusCode::NOT_FOUND,
                json!({"error": {"message": e.to_string(), "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}),
            )),
            Err(e) => {
                let mut refusal = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "adapter_load_failed"}}),
                );
                let why = match e {
                    AdapterError::Busy(_) => "busy",
                    _ => "load",
                };
                refusal.headers_mut().insert(
                    crate::adapters::FAILED_HEADER,
                    http::HeaderValue::from_static(why),
                );
                Err(refusal)
            }
        }
    }

    async fn forward(self, mut request: Request<RequestBody>) -> Response<Body> {
        let in_flight = self.readiness.in_flight.enter();
        let adapter = match self.adapter_for(&mut request).await {
            Ok(adapter) => adapter,
            Err(refused) => return self.with_resident(refused),
        };
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = match format!("{}{}", self.engine.to_string().trim_end_matches('/'), path)
            .parse::<Uri>()
        {
            Ok(uri) => uri,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request path: {e}")),
        };
        let span = tracing::info_span!(
            "proxy",
            otel.name = %format!("{} {}", parts.method, uri.path()),
            otel.kind = "server",
            http.request.method = %parts.method,
            url.path = %uri.path(),
            http.response.status_code = tracing::field::Empty,
        );
        infermesh_runtime::telemetry::continue_trace(&span, &parts.headers);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        // The engine continues the trace from this span (vLLM reads traceparent).
        infermesh_runtime::telemetry::propagate(&span, &mut parts.headers);
        let sent = self
            .client
            .request(Request::from_parts(parts, streamed(body)))
            .instrument(span.clone());
        match sent.await {
            Ok(response) => {
                span.record("http.response.status_code", response.status().as_u16());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The engine's latest load rides on every answer, so the edge
                // sees it at once, between pushed reports.
                let load = stamp(
                    &self.readiness.loads.borrow(),
                    self.readiness.in_flight.count(),
                );
                if let Ok(value) = http::HeaderValue::from_str(&load) {
                    parts.headers.insert(LOAD_HEADER, value);
                }
                // The span ends with the body, streams included.
                let body = Guarded::new(streamed(body), (span, in_flight, adapter)).boxed();
                self.with_resident(Response::from_parts(parts, body))
            }
            Err(e) => {
                tracing::warn!(error = %e, "engine request failed");
                error(
                    StatusCode::BAD_GATEWAY,
                    &format!("inference engine unreachable: {e}"),
                )
            }
        }
    }

    /// `response` with the resident adapters stamped on, when adapters are served.
    fn with_resident(&self, mut response: Response<Body>) -> Response<Body> {
        if let Some(adapters) = &self.adapters
            && let Ok(value) = http::HeaderValue::from_str(&adapters.stamp())
        {
            response
                .headers_mut()
                .insert(crate::adapters::RESIDENT_HEADER, value);
        }
        response
    }

    fn readyz(&self) -> Response<Body> {
        let healthy = self.readiness.loads.borrow().engine_healthy;
        let draining = *self.readiness.draining.borrow();
        let (status, text) = match (healthy, draining) {
            (_, true) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "engine not healthy"),
            (true, false) => (StatusCode::OK, "ready"),
        };
        json_response(status, json!({"status": text}))
    }
}

/// Response header carrying the engine's load as last scraped, for the edge.
pub const LOAD_HEADER: &str = "x-infermesh-load";

/// `r=<running>;w=<waiting>;kv=<KV-cache use>;f=<in flight>`, compact
/// and parseable: the engine's load as last scraped, and the requests in
/// flight through this sidecar now (the answered one included), which no
/// scrape interval makes stale.
pub fn stamp(load: &infermesh_proto::v1::Load, in_flight: usize) -> String {
    format!(
        "r={};w={};kv={:.3};f={in_flight}",
        load.running, load.waiting, load.kv_cache_usage
    )
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": "engine_unavailable"}}),
    )
}

/// Whether the caller proved an edge identity with its client certificate.
fn from_an_edge(request: &Request<RequestBody>) -> bool {
    request
        .extensions()
        .get::<PeerIdentity>()
        .is_some_and(|identity| identity.role == PeerRole::Edge)
}

impl tower::Service<Request<RequestBody>> for EngineProxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move {
            Ok(match request.uri().path() {
                "/livez" => json_response(StatusCode::OK, json!({"status": "alive"})),
                "/readyz" => proxy.readyz(),
                // Draining is for the pod's own hooks, on the unix socket
                // (`prestop`): a network caller must not take a replica out.
                "/prestop" => json_response(
                    StatusCode::FORBIDDEN,
                    json!({"error": {"message": "the preStop hook is served on the sidecar's unix socket (--prestop-socket), not over the network", "type": "permission_error", "code": "prestop_not_on_network"}}),
                ),
                // Adapters are loaded by the sidecar alone, from the
                // registry's sources: no caller may load a path of its own.
                "/v1/load_lora_adapter"
                | "/v1/unload_lora_adapter"
                | "/load_lora_adapter"
                | "/unload_lora_adapter" => json_response(
                    StatusCode::FORBIDDEN,
                    json!({"error": {"message": "adapters are loaded and unloaded by the sidecar, for requests that name a registered adapter", "type": "permission_error", "param": null, "code": "adapter_api_not_exposed"}}),
                ),
                _ if proxy.edges_only && !from_an_edge(&request) => {
                    let who = request
                        .extensions()
                        .get::<PeerIdentity>()
                        .map_or_else(|| "no client certificate".to_string(), |id| id.to_string());
                    tracing::warn!(peer = %who, path = %request.uri().path(), "request refused: not from an edge");
                    if let Some(metrics) = &proxy.metrics {
                        metrics.refused_caller();
                    }
                    infermesh_runtime::http::discard_body(
                        request.into_body(),
                        infermesh_runtime::http::DISCARD_LIMIT,
                    )
                    .await;
                    json_response(
                        StatusCode::FORBIDDEN,
                        json!({"error": {"message": format!("only edges may send requests to a replica (caller: {who})"), "type": "permission_error", "param": null, "code": "edge_identity_required"}}),
                    )
                }
                _ => {
                    let started = tokio::time::Instant::now();
                    let metrics = proxy.metrics.clone();
                    let response = proxy.forward(request).await;
                    if let Some(metrics) = metrics {
                        metrics.request(response.status(), started.elapsed());
                    }
                    response
                }
            })
        })
    }
}
