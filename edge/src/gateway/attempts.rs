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
use crate::table::{ModelRoute, RouteHints, Upstream};

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
}

/// The replica's answer and the engine fingerprint of the replica that gave it.
pub(crate) type Answer = (Response<Body>, String);

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
            let retryable = self.judge(&forwarded, route, &upstream, sent);
            if retryable
                && let Some((next, reason)) =
                    self.next_attempt(route, &mut tried, &upstream, request.hints)
            {
                tracing::debug!(from = %upstream.id, to = %next.id, %reason, "retrying on another replica");
                record.retries += 1;
                if let Some(metrics) = metrics {
                    metrics.retried(&route.model);
                }
                upstream = next;
                continue;
            }
            return match forwarded {
                Ok(response) => Ok((response, upstream.fingerprint.clone())),
                Err(failure) => Err(failure.error),
            };
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
    ) -> Option<(Arc<Upstream>, crate::route::Reason)> {
        tried.push(failed.id.clone());
        if tried.len() > self.resilience.max_retries as usize {
            return None;
        }
        let next = route.choose(hints, tried)?;
        self.resilience.budget.spend().then_some(next)
    }
}
