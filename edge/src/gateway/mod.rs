//! The innermost service of the edge: dispatches probes and `/v1/models`,
//! and runs inference calls through named stages, each in its own module:
//! parse (`request`), resolve, cache (`lookup`), wait (flow control), pick,
//! admit, forward (`attempts`), and respond with accounting. `infer` below
//! is the list of stages.

mod admit;
mod attempts;
mod explain;
mod keepalive;
mod lookup;
mod pick;
mod placing;
mod probes;
mod resolve;
mod respond;
#[cfg(test)]
mod tests;
mod wait;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use infermesh_runtime::discovery::{Applied, DemandBoard, SyncState};
use infermesh_runtime::http::{Body, full};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::access::Principal;
use crate::access_log::{AccessRecord, millis};
use crate::cache::ResponseCache;
use crate::error::ApiError;
use crate::forward::Forwarder;
use crate::health::{EjectionPolicy, RetryBudget};
use crate::metrics::Observer;
use crate::openai;
use crate::quota::{Ask, Limiter, Used};
use crate::table::EdgeTable;

use attempts::Attempts;
pub use explain::{Explaining, explain};
use lookup::Cached;
use resolve::{Resolution, Target};
use respond::Books;

/// The table the request path reads: `None` until the first push.
pub type Tables = watch::Receiver<Option<Arc<Applied<EdgeTable>>>>;

/// See the module docs.
#[derive(Clone)]
pub struct Gateway {
    tables: Tables,
    forwarder: Forwarder,
    limiter: Arc<Limiter>,
    observer: Observer,
    cache: Option<Arc<ResponseCache>>,
    resilience: Resilience,
    demand: Arc<DemandBoard>,
    sync: Arc<SyncState>,
    /// Flow-control queues by model, kept across table pushes.
    queues: Arc<dashmap::DashMap<String, Arc<crate::flow::Queue>>>,
    /// How long a streamed request waits at the edge before it is
    /// answered with keep-alive comments (zero: never).
    keepalive: std::time::Duration,
    /// Adapter loads this edge has under way.
    loading: Arc<placing::Loading>,
}

/// Retries and ejection settings.
#[derive(Debug, Clone)]
pub struct Resilience {
    /// Retries allowed as a share of requests.
    pub budget: Arc<RetryBudget>,
    /// Most attempts beyond the first for one request.
    pub max_retries: u32,
    /// When replicas are ejected.
    pub ejection: EjectionPolicy,
}

impl Gateway {
    /// A gateway routing by `tables` through `forwarder`, admitting
    /// requests through `limiter` and recording them with `observer`.
    pub fn new(
        tables: Tables,
        forwarder: Forwarder,
        limiter: Arc<Limiter>,
        observer: Observer,
        cache: Option<Arc<ResponseCache>>,
        resilience: Resilience,
    ) -> Self {
        Self {
            tables,
            forwarder,
            limiter,
            observer,
            cache,
            resilience,
            demand: Arc::default(),
            sync: Arc::default(),
            queues: Arc::default(),
            keepalive: keepalive::DEFAULT_INTERVAL,
            loading: Arc::default(),
        }
    }

    /// Sends SSE comments every `interval` to a streamed request held at
    /// the edge for longer than that (zero: never).
    pub fn with_keepalive(mut self, interval: std::time::Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// Reports the table's lag behind the control plane from `sync` on `/readyz`.
    pub fn with_sync(mut self, sync: Arc<SyncState>) -> Self {
        self.sync = sync;
        self
    }

    /// Signals pools that have scaled to zero through `demand`.
    pub fn with_demand(mut self, demand: Arc<DemandBoard>) -> Self {
        self.demand = demand;
        self
    }

    fn table(&self) -> Option<Arc<Applied<EdgeTable>>> {
        self.tables.borrow().clone()
    }

    async fn handle(
        self,
        request: Request<Bytes>,
        record: &mut AccessRecord,
    ) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path();
        let method = request.method();
        match (method, path) {
            (&Method::GET | &Method::HEAD, "/livez") => {
                Ok(json_response(StatusCode::OK, json!({"status": "alive"})))
            }
            (&Method::GET | &Method::HEAD, "/readyz") => Ok(self.readyz()),
            (&Method::GET, "/v1/models") => self.models(request.extensions().get::<Principal>()),
            (_, "/livez" | "/readyz" | "/v1/models") => Err(not_allowed(&request)),
            (&Method::POST, _) => match openai::Endpoint::from_path(path) {
                Some(endpoint) => self.infer(endpoint, request, record).await,
                None => Err(ApiError::NotFound(format!("{method} {path}"))),
            },
            (_, _) if openai::Endpoint::from_path(path).is_some() => Err(not_allowed(&request)),
            _ => Err(ApiError::NotFound(format!("{method} {path}"))),
        }
    }

    /// Runs an inference call through the stages.
    async fn infer(
        self,
        endpoint: openai::Endpoint,
        request: Request<Bytes>,
        record: &mut AccessRecord,
    ) -> Result<Response<Body>, ApiError> {
        let started = Instant::now();
        openai::check_content_type(request.headers())?;
        let table = self.table().ok_or(ApiError::NotReady)?;
        let (mut head, body) = request.into_parts();
        let for_cache = self.cache.is_some() && table.table.caching;
        let request = crate::request::parse_with(endpoint, &body, for_cache)?;
        record.model = Some(request.model.clone());
        record.stream = request.stream;
        let principal = head.extensions.get::<Principal>().cloned();
        let principal = principal.as_ref();
        let target = match self
            .resolve(table, &request, &head, principal, record)
            .await?
        {
            Resolution::Here(target) => target,
            Resolution::Spilled(response) => return Ok(response),
        };
        let model = target.route.model.as_str();
        record.served_model = Some(model.to_string());
        let capture = match self
            .lookup(&head.headers, &request, &target, principal, record)
            .await?
        {
            Cached::Hit(response) => return Ok(response),
            Cached::Miss(capture) => capture,
        };
        let ticket = self.wait_turn(&target, &request, principal, &head).await?;
        let hints = pick::hints(target.route.policy, &request, &head.headers);
        let (upstream, _load) = self.first_replica(&target, &hints, &mut head.headers)?;
        // Rewritten before admission: a body that cannot be rewritten is
        // refused before it counts against any limit. An adapter keeps its
        // name: the engine serves it under that name.
        let sent = request.upstream_body(target.engine_model(), target.route.engine_fields)?;
        let prompt = request.prompt_tokens_estimate;
        let ask = Ask::tokens(prompt, request.max_output_tokens)
            .choices(request.n)
            .priced(target.route.price);
        let mut admission = self.admit_counted(principal, model, &ask).await?;
        // Until the answer's body takes over the settling, a client that
        // leaves is charged its prompt.
        if let Some(admission) = &mut admission {
            admission.charge_if_dropped(Used {
                prompt,
                completion: 0,
            });
        }
        let in_flight = self.observer.metrics().map(|m| m.in_flight(model));
        // No stage after this one needs them, so no copy of the head is made.
        crate::forward::strip_client_credentials(&mut head.headers);
        let attempts = Attempts {
            head: &head,
            body: sent,
            route: &target.route,
            hints: &hints,
            adapter: target.adapter.as_deref(),
        };
        let answer = match self.forward(attempts, upstream, record).await {
            Ok(answer) => answer,
            Err(error) => {
                if let Some(admission) = admission {
                    admission.settle(Used::NONE);
                }
                return Err(error);
            }
        };
        let books = Books {
            admission,
            in_flight,
            ticket,
            capture,
            started,
        };
        Ok(self.respond(answer, &target, &request, books, record))
    }
}

impl Gateway {
    /// The replica for a request's first attempt (and the adapter load it
    /// starts); names the adapter in `headers` for the sidecar, and only
    /// the edge does.
    fn first_replica(
        &self,
        target: &Target,
        hints: &crate::table::RouteHints,
        headers: &mut http::HeaderMap,
    ) -> Result<(Arc<crate::table::Upstream>, Option<placing::LoadUnderWay>), ApiError> {
        headers.remove(crate::forward::ADAPTER_HEADER);
        let Some(adapter) = &target.adapter else {
            return Ok((pick::first(target, hints)?, None));
        };
        let value = http::HeaderValue::from_str(&adapter.name)
            .map_err(|_| ApiError::ModelNotFound(adapter.name.clone()))?;
        headers.insert(crate::forward::ADAPTER_HEADER, value);
        self.place_adapter(target, adapter, &[])
    }
}

/// Set on requests one edge forwards to another; such a request is never
/// forwarded again, so spillover cannot loop.
pub const HOP_HEADER: &str = "x-infermesh-hop";
/// Names the region whose edge served a spilled-over request.
pub const SPILLOVER_HEADER: &str = "x-infermesh-spillover";
pub use crate::receipt::ROUTE_HEADER;
/// Names a session for session affinity (else the body's `user` field).
pub const SESSION_HEADER: &str = "x-infermesh-session";

/// Names the fallback model that served the request.
pub const FALLBACK_HEADER: &str = "x-infermesh-fallback";

/// The server span of one request, continuing the caller's trace if it sent one.
fn request_span(request: &Request<Bytes>) -> tracing::Span {
    let method = request.method();
    let path = request.uri().path();
    let name = match openai::Endpoint::from_path(path) {
        Some(_) => format!("{method} {path}"),
        None => method.to_string(),
    };
    let span = tracing::info_span!(
        "request",
        otel.name = %name,
        otel.kind = "server",
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    );
    infermesh_runtime::telemetry::continue_trace(&span, request.headers());
    span
}

fn not_allowed(request: &Request<Bytes>) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
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

impl tower::Service<Request<Bytes>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Bytes>) -> Self::Future {
        let hold = keepalive::Hold::default();
        request.extensions_mut().insert(hold.clone());
        let interval = self.keepalive;
        let work: BoxFuture<'static, Response<Body>> = Box::pin(self.clone().serve(request));
        Box::pin(async move {
            if interval.is_zero() {
                return Ok(work.await);
            }
            let mut work = work;
            tokio::select! {
                response = &mut work => Ok(response),
                () = hold.held_for(interval) => Ok(keepalive::stream(work, interval)),
            }
        })
    }
}

impl Gateway {
    /// Answers one request and records it: access log, metrics, and the
    /// request counted against its key for a refusal that spends one.
    async fn serve(self, request: Request<Bytes>) -> Response<Body> {
        let started = Instant::now();
        let mut record = AccessRecord::begin(&request);
        let probe = matches!(request.uri().path(), "/livez" | "/readyz");
        let observer = self.observer.clone();
        let limiter = self.limiter.clone();
        let principal = request.extensions().get::<Principal>().cloned();
        let span = request_span(&request);
        let outcome = self
            .handle(request, &mut record)
            .instrument(span.clone())
            .await;
        let status = match &outcome {
            Ok(response) => response.status().as_u16(),
            Err(error) => error.status().as_u16(),
        };
        span.record("http.response.status_code", status);
        match outcome {
            Ok(response) => {
                if !record.deferred && !probe {
                    record.status = response.status().as_u16();
                    record.total_ms = millis(started.elapsed());
                    observer.finished(&record);
                }
                response
            }
            Err(error) => {
                if error.status().is_server_error() {
                    tracing::warn!(%error, "request failed");
                }
                record.error = Some(error.code().to_string());
                // A recognised key asking for what does not exist or
                // is not its own still spends a request: probing for
                // models is not free.
                if let (Some(principal), true) = (&principal, error.counts_as_request()) {
                    limiter.count_request(principal);
                }
                let response = error.into_response();
                record.status = response.status().as_u16();
                record.total_ms = millis(started.elapsed());
                observer.finished(&record);
                response
            }
        }
    }
}
