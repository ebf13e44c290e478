//! The innermost service of the edge: dispatches probes and `/v1/models`,
//! and for inference calls parses the routing fields, picks a replica of
//! the model in this region and forwards to it.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use infermesh_runtime::discovery::{Applied, DemandBoard, SyncState};
use infermesh_runtime::http::{Body, full};
use serde_json::json;
use tokio::sync::watch;
use tracing::Instrument;

use crate::access::Principal;
use crate::access_log::{AccessRecord, millis};
use crate::cache::tap::{CacheTap, Recording};
use crate::cache::{self, CACHE_HEADER, Decision, Joined, ResponseCache};
use crate::error::ApiError;
use crate::forward::Forwarder;
use crate::health::{EjectionPolicy, RetryBudget};
use crate::metrics::Observer;
use crate::openai;
use crate::quota::Limiter;
use crate::table::{ColdStart, EdgeTable, ModelRoute, Policy, RouteHints, Upstream};
use crate::usage::{Finish, UsageTap};

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
        }
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

    /// Waits, signalling demand, until a table gives `model` a replica or
    /// the pool's cold-start timeout passes.
    async fn wait_for_replica(
        &self,
        model: &str,
        cold: &ColdStart,
    ) -> Result<(Arc<Applied<EdgeTable>>, Arc<ModelRoute>), ApiError> {
        let deadline = Instant::now() + cold.timeout;
        let mut tables = self.tables.clone();
        tracing::info!(%model, pool = %cold.pool, timeout = ?cold.timeout, "holding a request while the pool scales up from zero");
        loop {
            self.demand.signal(&cold.pool);
            if let Some(table) = tables.borrow_and_update().clone()
                && let Some(route) = table.table.route(model)
                && !route.upstreams.is_empty()
            {
                let route = route.clone();
                return Ok((table, route));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::ColdStartTimeout {
                    model: model.to_string(),
                    pool: cold.pool.clone(),
                    after: cold.timeout,
                });
            }
            // Demand records live for seconds: renew them while waiting.
            let wake = (deadline - now).min(Duration::from_secs(2));
            if let Ok(Err(_)) = tokio::time::timeout(wake, tables.changed()).await {
                return Err(ApiError::NotReady);
            }
        }
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

    fn readyz(&self) -> Response<Body> {
        match self.table() {
            // Lag does not make the edge unready: it still serves with the
            // table it has, and taking every edge of a region out because a
            // control plane pushed something unusable would turn a bad
            // object into an outage. The lag is reported and alerted on.
            Some(table) => json_response(
                StatusCode::OK,
                json!({"status": "ready", "table_version": table.version, "region": table.table.region,
                       "stale": table.table.from_disk,
                       "offered_version": self.sync.offered_version(),
                       "lag_seconds": self.sync.lag().as_secs_f64(),
                       "skipped_objects": table.table.skipped.len(),
                       "refused_tables": self.sync.refusals()}),
            ),
            None => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "waiting for the first routing table"}),
            ),
        }
    }

    fn models(&self, principal: Option<&Principal>) -> Result<Response<Body>, ApiError> {
        let table = self.table().ok_or(ApiError::NotReady)?;
        // Each name a client may send, canonical names and aliases alike;
        // `root` names the model an alias stands for, as vLLM's list does.
        let data: Vec<_> = table
            .table
            .models
            .iter()
            .filter(|m| principal.is_none_or(|p| p.key.allows(&m.name)))
            .flat_map(|m| {
                std::iter::once(json!({"id": m.name, "object": "model", "created": 0,
                    "owned_by": "infermesh", "root": m.name, "parent": null, "aliases": m.aliases}))
                .chain(m.aliases.iter().map(|alias| {
                    json!({"id": alias, "object": "model", "created": 0,
                        "owned_by": "infermesh", "root": m.name, "parent": null})
                }))
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            json!({"object": "list", "data": data}),
        ))
    }

    async fn infer(
        self,
        endpoint: openai::Endpoint,
        request: Request<Bytes>,
        record: &mut AccessRecord,
    ) -> Result<Response<Body>, ApiError> {
        let started = Instant::now();
        openai::check_content_type(request.headers())?;
        let table = self.table().ok_or(ApiError::NotReady)?;
        let (mut parts, body) = request.into_parts();
        let fields = openai::routing_fields(endpoint, &body)?;
        record.model = Some(fields.model.clone());
        record.stream = fields.stream;
        let route = table
            .table
            .route(&fields.model)
            .ok_or_else(|| ApiError::ModelNotFound(fields.model.clone()))?;
        let principal = parts.extensions.get::<Principal>().cloned();
        if let Some(p) = principal.as_ref().filter(|p| !p.key.allows(&route.model)) {
            return Err(ApiError::ModelNotAllowed {
                key: p.key.prefix.clone(),
                model: fields.model.clone(),
            });
        }
        let mut route = route.clone();
        let mut table = table;
        let mut fallback = None;
        if route.upstreams.is_empty() {
            // A pool that scaled to zero comes back for this request, even
            // when another region or a fallback serves it meanwhile.
            if let Some(cold) = &route.cold_start {
                self.demand.signal(&cold.pool);
            }
            // Nothing serves the model here: its region's failover edges
            // first (once: a forwarded request is never forwarded again),
            // then the model's fallbacks served here.
            if !parts.headers.contains_key(HOP_HEADER)
                && let Some(response) = self
                    .spill(&table.table, &parts, &body, &route.model, record)
                    .await
            {
                return Ok(response);
            }
            let allowed =
                |r: &&Arc<ModelRoute>| principal.as_ref().is_none_or(|p| p.key.allows(&r.model));
            if let Some(other) = route
                .fallbacks
                .iter()
                .filter_map(|name| table.table.route(name))
                .filter(allowed)
                .find(|r| !r.upstreams.is_empty())
            {
                tracing::debug!(model = %route.model, fallback = %other.model, "serving with a fallback model");
                fallback = Some(other.model.clone());
                route = other.clone();
            } else if let Some(cold) = route.cold_start.clone() {
                (table, route) = self.wait_for_replica(&route.model.clone(), &cold).await?;
            }
        }
        record.served_model = Some(route.model.clone());
        let mut flight = None;
        let mut recording = None;
        if let Some(cache) = &self.cache {
            let tenant = principal.as_ref().map_or("", |p| &*p.cache_scope);
            let decision = cache.decide(
                &parts.headers,
                endpoint,
                &fields,
                &body,
                route.cache.as_ref(),
                tenant,
                &route.model,
                route.upstreams.iter().map(|u| u.fingerprint.as_str()),
            );
            match decision {
                Decision::Off => {}
                Decision::Bypass => record.cache = "bypass",
                Decision::Use(lookup) => {
                    record.cache = if lookup.lookup { "miss" } else { "bypass" };
                    let mut cached = None;
                    if lookup.lookup {
                        cached = cache.get(&lookup).await;
                        // Identical misses wait for one engine answer (one fingerprint only:
                        // during a rollout each replica's answer is its own).
                        if let (None, [(_, key)]) = (&cached, lookup.keys.as_slice()) {
                            match cache.join(key) {
                                Joined::Leader(leader) => flight = Some(leader),
                                Joined::Follower(rx) => cached = cache.follow(rx).await,
                            }
                        }
                    }
                    if let Some(answer) = cached {
                        return self.serve_cached(
                            answer,
                            endpoint,
                            &fields,
                            principal.as_ref(),
                            record,
                        );
                    }
                    if lookup.store {
                        recording = Some((cache.clone(), lookup));
                    }
                }
            }
        }
        let hints = RouteHints {
            prefix: (route.policy == Policy::PrefixAffinity)
                .then(|| openai::prompt_text(endpoint, &body))
                .flatten()
                .map(|prompt| crate::prefix::block_keys(&prompt)),
            session: (route.policy == Policy::SessionAffinity)
                .then(|| session_of(&parts.headers, &fields))
                .flatten(),
        };
        let upstream = {
            let span = tracing::info_span!(
                "route",
                otel.name = "route",
                infermesh.model = %route.model,
                infermesh.policy = route.policy.as_str(),
                infermesh.candidates = route.upstreams.len(),
                infermesh.table_version = table.version,
                infermesh.endpoint = tracing::field::Empty,
                infermesh.reason = tracing::field::Empty,
            );
            let _entered = span.enter();
            let picked = route.choose(&hints, &[]);
            if let Some((chosen, reason)) = &picked {
                span.record("infermesh.endpoint", chosen.id.as_str());
                span.record("infermesh.reason", tracing::field::display(reason));
            } else {
                span.record("infermesh.reason", "no serving replica in this region");
            }
            let (upstream, _reason) =
                picked.ok_or_else(|| ApiError::NoHealthyReplica(route.model.clone()))?;
            upstream
        };
        // Rewritten before admission: a body that cannot be rewritten is
        // refused before it counts against any limit.
        let refused = fields.engine_fields.without(route.engine_fields);
        if !refused.is_empty() {
            tracing::debug!(model = %route.model, fields = ?refused.names().collect::<Vec<_>>(), "engine fields removed: the model does not allow them");
        }
        let body = openai::upstream_body(body, &fields, &route.model, route.engine_fields)?;
        let metrics = self.observer.metrics();
        let admission = principal
            .as_ref()
            .map(|p| {
                self.limiter
                    .admit(p, fields.prompt_tokens_estimate, fields.max_tokens)
            })
            .transpose()
            .inspect_err(|error| {
                if let (ApiError::RateLimited { kind, .. }, Some(metrics)) = (error, metrics) {
                    metrics.rate_limited(&route.model, kind);
                }
            })?;
        let in_flight = metrics.map(|m| m.in_flight(&route.model));
        tracing::debug!(model = %route.model, endpoint = %upstream.id, stream = fields.stream, "routing");
        self.resilience.budget.earn();
        let deadlines = self.forwarder.deadlines(route.timeouts.as_ref());
        let mut upstream = upstream;
        let mut tried: Vec<String> = Vec::new();
        // No step after this one needs them, so no copy of the head is made.
        crate::forward::strip_client_credentials(&mut parts.headers);
        let head = &parts;
        let (mut response, fingerprint) = loop {
            record.endpoint = Some(upstream.id.clone());
            let sent = Instant::now();
            let forwarded = self
                .forwarder
                .forward(head, body.clone(), upstream.clone(), &deadlines)
                .await;
            if let Some(metrics) = metrics {
                metrics.upstream(&route.model, &upstream.id, sent.elapsed());
            }
            let retryable = match &forwarded {
                Ok(response) => {
                    let status = response.status();
                    if status.is_server_error() {
                        self.failed(&upstream);
                    } else {
                        upstream.health.success();
                        upstream.health.observe_latency(sent.elapsed());
                        self.eject_if_slow(&route, &upstream);
                    }
                    // The sidecar says its engine is unreachable or not ready.
                    matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                    )
                }
                Err(failure) => {
                    self.failed(&upstream);
                    failure.retryable
                }
            };
            if retryable
                && let Some((next, reason)) =
                    self.next_attempt(&route, &mut tried, &upstream, &hints)
            {
                tracing::debug!(from = %upstream.id, to = %next.id, %reason, "retrying on another replica");
                record.retries += 1;
                if let Some(metrics) = metrics {
                    metrics.retried(&route.model);
                }
                upstream = next;
                continue;
            }
            match forwarded {
                Ok(response) => break (response, upstream.fingerprint.clone()),
                Err(failure) => {
                    if let Some(admission) = admission {
                        admission.settle(0);
                    }
                    return Err(failure.error);
                }
            }
        };
        if let Some(admission) = &admission {
            response.headers_mut().extend(admission.headers.clone());
        }
        record.status = response.status().as_u16();
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if record.cache != "none" {
            response
                .headers_mut()
                .insert(CACHE_HEADER, http::HeaderValue::from_static(record.cache));
        }
        if let Some(value) = fallback.and_then(|f| http::HeaderValue::from_str(&f).ok()) {
            response.headers_mut().insert(FALLBACK_HEADER, value);
        }
        if route.receipts {
            let receipt = crate::receipt::render(
                route.policy.as_str(),
                record.endpoint.as_deref().unwrap_or(""),
                &table.table.region,
                table.version,
                record.retries,
            );
            if let Ok(value) = http::HeaderValue::from_str(&receipt) {
                response.headers_mut().insert(ROUTE_HEADER, value);
            }
        }
        if let Some((cache, lookup)) = recording
            && response.status() == StatusCode::OK
            && let Some(key) = lookup.key_for(&fingerprint)
        {
            let recording = Recording {
                cache,
                key: key.to_string(),
                ttl: lookup.ttl,
                max_bytes: lookup.max_bytes,
                endpoint,
                sse,
                flight: flight.take(),
            };
            response = response.map(|body| CacheTap::new(body, recording).boxed());
        }
        let failed = !response.status().is_success();
        let strip = fields.stream && !fields.include_usage;
        let finish = Finish {
            admission,
            record: record.clone(),
            observer: self.observer.clone(),
            in_flight,
            span: tracing::Span::current(),
            started,
            failed,
        };
        // The tap writes the access line when the body ends.
        record.deferred = true;
        Ok(response.map(|body| UsageTap::new(body, sse, strip, finish).boxed()))
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

/// The session of a request: its session header, else the body's `user`.
fn session_of(headers: &http::HeaderMap, fields: &openai::RoutingFields) -> Option<String> {
    headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .or_else(|| fields.user.clone())
}

/// Names the fallback model that served the request.
pub const FALLBACK_HEADER: &str = "x-infermesh-fallback";

impl Gateway {
    /// Forwards the request to the first failover region's edge that
    /// answers without a server error; `None` when none did.
    async fn spill(
        &self,
        table: &EdgeTable,
        parts: &http::request::Parts,
        body: &Bytes,
        model: &str,
        record: &mut AccessRecord,
    ) -> Option<Response<Body>> {
        let mut head = crate::forward::copy_parts(parts);
        let hop = http::HeaderValue::from_str(&table.region).ok()?;
        head.headers.insert(HOP_HEADER, hop);
        for peer in &table.failover {
            let edge = Arc::new(Upstream {
                id: format!("edge/{}", peer.region),
                pool: String::new(),
                authority: peer.authority.clone(),
                mesh_authority: peer.mesh_authority.clone(),
                in_flight: Arc::default(),
                health: Arc::default(),
                load: Arc::default(),
                fingerprint: String::new(),
            });
            let deadlines = self.forwarder.deadlines(None);
            match self
                .forwarder
                .forward(&head, body.clone(), edge, &deadlines)
                .await
            {
                Ok(mut response) if !response.status().is_server_error() => {
                    tracing::debug!(%model, region = %peer.region, "spilled over to another region");
                    record.endpoint = Some(format!("edge/{}", peer.region));
                    if let Some(metrics) = self.observer.metrics() {
                        metrics.spilled(model, &peer.region);
                    }
                    if let Ok(value) = http::HeaderValue::from_str(&peer.region) {
                        response.headers_mut().insert(SPILLOVER_HEADER, value);
                    }
                    return Some(response);
                }
                Ok(response) => {
                    tracing::debug!(region = %peer.region, status = %response.status(), "failover edge could not serve");
                }
                Err(failure) => {
                    tracing::debug!(region = %peer.region, error = %failure.error, "failover edge unreachable");
                }
            }
        }
        None
    }

    /// Counts a failure against `upstream`, ejecting it when it fails too often.
    fn failed(&self, upstream: &Upstream) {
        if let Some(length) = upstream.health.failure(&self.resilience.ejection) {
            tracing::warn!(endpoint = %upstream.id, ejected_for = ?length, "replica ejected after consecutive failures");
            if let Some(metrics) = self.observer.metrics() {
                metrics.ejected(&upstream.id);
            }
        }
    }

    /// Ejects `upstream` when it answers far slower than its peers.
    fn eject_if_slow(&self, route: &ModelRoute, upstream: &Upstream) {
        let Some(latency) = upstream.health.latency() else {
            return;
        };
        let peers: Vec<_> = route
            .upstreams
            .iter()
            .filter(|u| u.id != upstream.id && !u.health.is_ejected())
            .filter_map(|u| u.health.latency())
            .collect();
        if crate::health::Health::is_slow_outlier(latency, peers)
            && let Some(length) = upstream.health.eject_slow(&self.resilience.ejection)
        {
            tracing::warn!(endpoint = %upstream.id, ?latency, ejected_for = ?length, "replica ejected as far slower than its peers");
            if let Some(metrics) = self.observer.metrics() {
                metrics.ejected(&upstream.id);
            }
        }
    }

    /// Another replica for a failed attempt, if one is left, retries remain
    /// and the retry budget allows it.
    fn next_attempt(
        &self,
        route: &ModelRoute,
        tried: &mut Vec<String>,
        failed: &Upstream,
        hints: &RouteHints,
    ) -> Option<(Arc<Upstream>, crate::route::Reason)> {
        tried.push(failed.id.clone());
        if tried.len() > self.resilience.max_retries as usize {
            return None;
        }
        let next = route.choose(hints, tried)?;
        self.resilience.budget.spend().then_some(next)
    }

    /// Answers from the cache: as stored, or replayed as a stream. The
    /// request counts against the caller's request limits, not its tokens.
    fn serve_cached(
        &self,
        answer: Bytes,
        endpoint: openai::Endpoint,
        fields: &openai::RoutingFields,
        principal: Option<&Principal>,
        record: &mut AccessRecord,
    ) -> Result<Response<Body>, ApiError> {
        let admission = principal
            .map(|p| self.limiter.admit(p, 0, Some(0)))
            .transpose()
            .inspect_err(|error| {
                if let (ApiError::RateLimited { kind, .. }, Some(metrics), Some(model)) = (
                    error,
                    self.observer.metrics(),
                    record.served_model.as_deref(),
                ) {
                    metrics.rate_limited(model, kind);
                }
            })?;
        let (body, content_type) = if fields.stream {
            let value: serde_json::Value =
                serde_json::from_slice(&answer).map_err(|e| ApiError::UpstreamFailed {
                    endpoint: "cache".into(),
                    reason: format!("cached answer is not JSON: {e}"),
                })?;
            (
                cache::replay::to_sse(&value, endpoint, fields.include_usage),
                "text/event-stream",
            )
        } else {
            (answer, "application/json")
        };
        let mut response = Response::new(full(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        headers.insert(CACHE_HEADER, http::HeaderValue::from_static("hit"));
        if let Some(admission) = admission {
            headers.extend(admission.headers.clone());
            admission.settle(0);
        }
        record.cache = "hit";
        record.stream = fields.stream;
        Ok(response)
    }
}

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

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let gateway = self.clone();
        Box::pin(async move {
            let started = Instant::now();
            let mut record = AccessRecord::begin(&request);
            let probe = matches!(request.uri().path(), "/livez" | "/readyz");
            let observer = gateway.observer.clone();
            let span = request_span(&request);
            let outcome = gateway
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
                    Ok(response)
                }
                Err(error) => {
                    if error.status().is_server_error() {
                        tracing::warn!(%error, "request failed");
                    }
                    record.error = Some(error.code().to_string());
                    let response = error.into_response();
                    record.status = response.status().as_u16();
                    record.total_ms = millis(started.elapsed());
                    observer.finished(&record);
                    Ok(response)
                }
            }
        })
    }
}
