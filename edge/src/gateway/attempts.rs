//! Forward: sends the request to the chosen replica and, when it fails
//! before answering, to others, within the retry limit and budget; counts
//! failures and slowness against each replica (passive health, ejection).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use infermesh_runtime::http::Body;
use tokio::time::Instant;

use super::Gateway;
use crate::access_log::AccessRecord;
use crate::error::ApiError;
use crate::table::{AdapterRoute, ModelRoute, RouteHints, Upstream};

/// One request's forwarding: what is sent, and where it may go.
pub(crate) struct Attempts<'a> {
    /// The head to send (client credentials already removed).
    pub head: &'a http::request::Parts,
    /// The body to send.
    pub body: Bytes,
    /// The serving model's route.
    pub route: &'a ModelRoute,
    /// The policy's hints, for picking a replica to retry on.
    pub hints: &'a RouteHints,
    /// The LoRA adapter the request uses, if any.
    pub adapter: Option<&'a AdapterRoute>,
}

/// The replica's answer and the engine fingerprint of the replica that gave it.
pub(crate) type Answer = (Response<Body>, String);

/// Largest 404 body read to tell an engine's own refusal from a path it lacks.
const NOT_FOUND_READ: usize = 64 * 1024;

/// An engine's 404 that is not an OpenAI-style error (FastAPI's
/// `{"detail":"Not Found"}` for a path it does not serve) becomes a clear
/// `endpoint_not_served`; any other answer passes as it is.
async fn served(answer: Answer, model: &str, path: &str) -> Result<Answer, ApiError> {
    let (response, fingerprint) = answer;
    if response.status() != StatusCode::NOT_FOUND {
        return Ok((response, fingerprint));
    }
    let (head, body) = response.into_parts();
    let bytes = read_small(body).await;
    let openai_error = serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_object));
    if openai_error {
        let body = infermesh_runtime::http::full(bytes);
        return Ok((Response::from_parts(head, body), fingerprint));
    }
    Err(ApiError::EndpointNotServed {
        model: model.to_string(),
        path: path.to_string(),
    })
}

/// Up to `NOT_FOUND_READ` bytes of `body` (nothing if it is longer or fails).
fn read_small(body: Body) -> futures_util::future::BoxFuture<'static, Bytes> {
    Box::pin(async move {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > NOT_FOUND_READ {
                    return Bytes::new();
                }
                out.extend_from_slice(&data);
            }
        }
        Bytes::from(out)
    })
}

impl Gateway {
    /// Forwards to `upstream`, retrying elsewhere while the failure allows it.
    pub(crate) async fn forward(
        &self,
        request: Attempts<'_>,
        mut upstream: Arc<Upstream>,
        record: &mut AccessRecord,
    ) -> Result<Answer, ApiError> {
        let route = request.route;
        self.resilience.budget.earn();
        let deadlines = self.forwarder.deadlines(route.timeouts.as_ref());
        let metrics = self.observer.metrics();
        let mut tried: Vec<String> = Vec::new();
        loop {
            record.endpoint = Some(upstream.id.clone());
            let sent = Instant::now();
            let forwarded = self
                .forwarder
                .forward(
                    request.head,
                    request.body.clone(),
                    upstream.clone(),
                    &deadlines,
                )
                .await;
            if let Some(metrics) = metrics {
                metrics.upstream(&route.model, &upstream.id, sent.elapsed());
            }
            // A replica that could not load the adapter is not unhealthy:
            // one other replica is tried, then its refusal is the answer.
            if let (Some(adapter), Ok(response)) = (request.adapter, &forwarded)
                && response
                    .headers()
                    .contains_key(crate::forward::ADAPTER_FAILED_HEADER)
            {
                tried.push(upstream.id.clone());
                let retry = (tried.len() == 1)
                    .then(|| super::placing::place(route, adapter, &tried, &self.loading))
                    .flatten();
                if let Some((next, reason)) = retry {
                    tracing::info!(adapter = %adapter.name, from = %upstream.id, to = %next.id, %reason, "adapter load failed; trying another replica");
                    record.retries += 1;
                    upstream = next;
                    continue;
                }
                self.adapter_failed(route, adapter);
            }
            let adapter_refused = request.adapter.is_some()
                && forwarded.as_ref().is_ok_and(|r| {
                    r.headers()
                        .contains_key(crate::forward::ADAPTER_FAILED_HEADER)
                });
            let retryable = !adapter_refused && self.judge(&forwarded, route, &upstream, sent);
            if retryable
                && let Some((next, reason)) =
                    self.next_attempt(route, &mut tried, &upstream, request.hints, request.adapter)
            {
                tracing::debug!(from = %upstream.id, to = %next.id, %reason, "retrying on another replica");
                record.retries += 1;
                if let Some(metrics) = metrics {
                    metrics.retried(&route.model);
                }
                upstream = next;
                continue;
            }
            let mut response = forwarded.map_err(|failure| failure.error)?;
            response
                .headers_mut()
                .remove(crate::forward::ADAPTER_FAILED_HEADER);
            let answer = (response, upstream.fingerprint.clone());
            return served(answer, &route.model, request.head.uri.path()).await;
        }
    }

    /// Counts the outcome against `upstream` and says whether another
    /// replica may be tried.
    fn judge(
        &self,
        forwarded: &Result<Response<Body>, crate::forward::Failure>,
        route: &ModelRoute,
        upstream: &Upstream,
        sent: Instant,
    ) -> bool {
        match forwarded {
            Ok(response) => {
                let status = response.status();
                if status.is_server_error() {
                    self.failed(upstream);
                } else {
                    upstream.health.success();
                    upstream.health.observe_latency(sent.elapsed());
                    self.eject_if_slow(route, upstream);
                }
                // The sidecar says its engine is unreachable or not ready.
                matches!(
                    status,
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                )
            }
            Err(failure) => {
                self.failed(upstream);
                failure.retryable
            }
        }
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
        adapter: Option<&AdapterRoute>,
    ) -> Option<(Arc<Upstream>, crate::route::Reason)> {
        tried.push(failed.id.clone());
        if tried.len() > self.resilience.max_retries as usize {
            return None;
        }
        let next = match adapter {
            Some(adapter) => super::placing::place(route, adapter, tried, &self.loading)?,
            None => route.choose(hints, tried)?,
        };
        self.resilience.budget.spend().then_some(next)
    }
}
