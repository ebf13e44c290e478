//! Sends a request to the chosen replica over pooled connections and hands
//! back its response as it arrives: the body streams through untouched,
//! chunk by chunk, and dropping it (a client that went away) closes the
//! upstream request so the engine stops generating.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri, header};
use http_body_util::BodyExt;
use infermesh_runtime::http::{
    Body, Guarded, UpstreamClient, full, strip_hop_by_hop, upstream_client,
};
use tracing::Instrument;

use crate::error::ApiError;
use crate::table::Upstream;

/// Counts a request as in flight to a replica until dropped.
pub struct InFlight(Arc<Upstream>);

impl InFlight {
    /// Starts counting a request to `upstream`.
    pub fn start(upstream: Arc<Upstream>) -> Self {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(upstream)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Response header in which sidecars stamp their engine's load.
pub const LOAD_HEADER: &str = "x-infermesh-load";

/// Why a forward failed, and whether another replica may be tried.
#[derive(Debug)]
pub struct Failure {
    /// The error for the client if no other attempt is made.
    pub error: ApiError,
    /// True when nothing of the response was received (connect failure, a
    /// connection closed before the response headers).
    pub retryable: bool,
}

/// A copy of a request head for one attempt (extensions are not forwarded).
pub fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// Forwards requests to replicas.
#[derive(Clone)]
pub struct Forwarder {
    client: UpstreamClient,
    response_timeout: Duration,
}

impl Forwarder {
    /// A forwarder whose connects give up after `connect_timeout` and whose
    /// responses must start within `response_timeout`.
    pub fn new(connect_timeout: Duration, response_timeout: Duration) -> Self {
        Self {
            client: upstream_client(connect_timeout),
            response_timeout,
        }
    }

    /// Sends `parts` + `body` to `upstream`; the response body streams and
    /// keeps the request counted as in flight until it ends.
    pub async fn forward(
        &self,
        request: &http::request::Parts,
        body: Bytes,
        upstream: Arc<Upstream>,
    ) -> Result<Response<Body>, Failure> {
        let mut parts = copy_parts(request);
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(upstream.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Failure {
                error: ApiError::UpstreamFailed {
                    endpoint: upstream.id.clone(),
                    reason: format!("cannot build upstream URI: {e}"),
                },
                retryable: false,
            })?;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, body.len().into());
        let span = tracing::info_span!(
            "upstream",
            otel.name = %format!("{} {}", parts.method, parts.uri.path()),
            otel.kind = "client",
            server.address = %upstream.authority,
            infermesh.endpoint = %upstream.id,
            http.response.status_code = tracing::field::Empty,
        );
        infermesh_runtime::telemetry::propagate(&span, &mut parts.headers);
        let in_flight = InFlight::start(upstream.clone());
        let request = Request::from_parts(parts, full(body));
        let sent = tokio::time::timeout(self.response_timeout, self.client.request(request))
            .instrument(span.clone());
        let response = match sent.await {
            Err(_) => {
                // The engine may still be working on it: not retried.
                return Err(Failure {
                    error: ApiError::UpstreamTimeout {
                        endpoint: upstream.id.clone(),
                        after: self.response_timeout,
                    },
                    retryable: false,
                });
            }
            Ok(Err(error)) => {
                let reason = if error.is_connect() {
                    format!("connect to {} failed", upstream.authority)
                } else {
                    format!("{error}")
                };
                // Refused, reset or closed before any response: nothing
                // reached the client, so another replica may answer.
                return Err(Failure {
                    error: ApiError::UpstreamFailed {
                        endpoint: upstream.id.clone(),
                        reason,
                    },
                    retryable: true,
                });
            }
            Ok(Ok(response)) => response,
        };
        span.record("http.response.status_code", response.status().as_u16());
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The sidecar's load stamp is for this edge, not the client.
        if let Some(stamp) = parts.headers.remove(LOAD_HEADER)
            && let Ok(stamp) = stamp.to_str()
        {
            upstream.load.update(stamp);
        }
        // The upstream span, like the replica's in-flight count, lasts until the body ends.
        let body = Guarded::new(body, (in_flight, span))
            .map_err(Into::into)
            .boxed();
        Ok(Response::from_parts(parts, body))
    }
}
