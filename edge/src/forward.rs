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
    Body, Guarded, UpstreamClient, full, mesh_upstream_client, strip_hop_by_hop, upstream_client,
};
use infermesh_runtime::tls::mesh::MeshClientTls;
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
/// The LoRA adapters a sidecar's engine holds (`name@version` apart by
/// spaces), stamped on every answer; for this edge, not the client.
pub const ADAPTERS_HEADER: &str = "x-infermesh-adapters";
/// The adapter a request uses, for the sidecar to load when needed; set by
/// the edge only.
pub const ADAPTER_HEADER: &str = "x-infermesh-adapter";
/// Set by a sidecar on its refusal when an adapter could not be loaded.
pub const ADAPTER_FAILED_HEADER: &str = "x-infermesh-adapter-failed";

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

/// Headers that carry the client's own credentials. The edge has checked
/// them; a replica has no use for them, and sending them on would hand
/// every tenant's API key to whatever sits at a replica's address.
const CLIENT_CREDENTIALS: [&str; 3] = ["authorization", "x-api-key", "proxy-authorization"];

/// Removes the client's credentials from a head about to go to a replica.
pub fn strip_client_credentials(headers: &mut http::HeaderMap) {
    for name in CLIENT_CREDENTIALS {
        headers.remove(name);
    }
}

/// The deadlines of one request to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Connecting.
    pub connect: Duration,
    /// From sending until the response headers.
    pub first_byte: Duration,
    /// Longest gap between two body chunks.
    pub idle: Option<Duration>,
    /// The whole exchange, body included.
    pub total: Option<Duration>,
}

/// A replica reached in-process (tests, embedding): a tower service from
/// request to response. Its errors count as connection failures.
pub type LocalService = tower::util::BoxCloneSyncService<
    Request<Body>,
    Response<Body>,
    Box<dyn std::error::Error + Send + Sync>,
>;

/// Forwards requests to replicas.
#[derive(Clone)]
pub struct Forwarder {
    defaults: Deadlines,
    /// One pooled client per connect deadline in use (the edge's, and any
    /// model's own).
    clients: Arc<dashmap::DashMap<Duration, UpstreamClient>>,
    /// Mutual TLS to replicas, when on.
    mesh: Option<MeshClientTls>,
    /// Every replica is this service instead of the network, when set.
    local: Option<LocalService>,
}

impl Forwarder {
    /// A forwarder with the edge's `deadlines` (a model's own replace
    /// them field by field); with `mesh`, replicas are reached over mutual
    /// TLS and must prove they are the endpoint chosen.
    pub fn new(deadlines: Deadlines, mesh: Option<MeshClientTls>) -> Self {
        let connect_timeout = deadlines.connect;
        let forwarder = Self {
            defaults: deadlines,
            clients: Arc::new(dashmap::DashMap::new()),
            mesh,
            local: None,
        };
        forwarder.client(connect_timeout);
        forwarder
    }

    /// A forwarder whose every replica is `service`, with `deadlines`.
    pub fn local(deadlines: Deadlines, service: LocalService) -> Self {
        Self {
            defaults: deadlines,
            clients: Arc::new(dashmap::DashMap::new()),
            mesh: None,
            local: Some(service),
        }
    }

    /// The deadlines for a model with `timeouts` (its zero fields take the edge's).
    pub fn deadlines(&self, timeouts: Option<&infermesh_proto::v1::ModelTimeouts>) -> Deadlines {
        let Some(t) = timeouts else {
            return self.defaults;
        };
        let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));
        Deadlines {
            connect: ms(t.connect_ms).unwrap_or(self.defaults.connect),
            first_byte: ms(t.first_byte_ms).unwrap_or(self.defaults.first_byte),
            idle: ms(t.idle_ms).or(self.defaults.idle),
            total: ms(t.total_ms).or(self.defaults.total),
        }
    }

    fn client(&self, connect: Duration) -> UpstreamClient {
        self.clients
            .entry(connect)
            .or_insert_with(|| match &self.mesh {
                Some(mesh) => mesh_upstream_client(connect, mesh),
                None => upstream_client(connect),
            })
            .clone()
    }

    /// Sends `parts` + `body` to `upstream`; the response body streams and
    /// keeps the request counted as in flight until it ends.
    pub async fn forward(
        &self,
        request: &http::request::Parts,
        body: Bytes,
        upstream: Arc<Upstream>,
        deadlines: &Deadlines,
    ) -> Result<Response<Body>, Failure> {
        let started = tokio::time::Instant::now();
        let first_byte = deadlines.total.map_or(deadlines.first_byte, |total| {
            total.min(deadlines.first_byte)
        });
        let mut parts = self.upstream_head(request, &upstream, body.len())?;
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
        let sent = tokio::time::timeout(first_byte, self.send(request, deadlines.connect))
            .instrument(span.clone());
        let response = match sent.await {
            Err(_) => {
                // The engine may still be working on it: not retried.
                return Err(Failure {
                    error: ApiError::UpstreamTimeout {
                        endpoint: upstream.id.clone(),
                        after: first_byte,
                    },
                    retryable: false,
                });
            }
            Ok(Err(reason)) => {
                // Refused, reset or closed before any response: nothing
                // reached the client, so another replica may answer.
                return Err(Failure {
                    error: ApiError::UpstreamFailed {
                        endpoint: upstream.id.clone(),
                        reason: reason.describe(&upstream.authority),
                    },
                    retryable: true,
                });
            }
            Ok(Ok(response)) => response,
        };
        span.record("http.response.status_code", response.status().as_u16());
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The engine's server software is the fleet's business, not the client's.
        parts.headers.remove(header::SERVER);
        // The sidecar's load stamp is for this edge, not the client.
        if let Some(stamp) = parts.headers.remove(LOAD_HEADER)
            && let Ok(stamp) = stamp.to_str()
        {
            upstream
                .load
                .update_seen(stamp, upstream.in_flight.load(Ordering::Relaxed));
        }
        if let Some(listed) = parts.headers.remove(ADAPTERS_HEADER)
            && let Ok(listed) = listed.to_str()
        {
            upstream.load.update_adapters(listed);
        }
        // The upstream span, like the replica's in-flight count, lasts until the body ends.
        let body = Guarded::new(body, (in_flight, span)).boxed();
        let body = match (deadlines.idle, deadlines.total) {
            (None, None) => body,
            (idle, total) => TimedBody::new(body, idle, total.map(|t| started + t)).boxed(),
        };
        Ok(Response::from_parts(parts, body))
    }
}

impl Forwarder {
    /// The head of the request to `upstream`: the client's, addressed to
    /// the replica (its mesh address under mutual TLS) over HTTP/1.1,
    /// without hop-by-hop headers or the client's Host, with the length
    /// of the body as read.
    fn upstream_head(
        &self,
        request: &http::request::Parts,
        upstream: &Upstream,
        body_len: usize,
    ) -> Result<http::request::Parts, Failure> {
        let mut parts = copy_parts(request);
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let (scheme, authority) = match (&self.mesh, &upstream.mesh_authority) {
            (Some(_), Some(mesh_authority)) => ("https", mesh_authority),
            _ => ("http", &upstream.authority),
        };
        parts.uri = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
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
            .insert(header::CONTENT_LENGTH, body_len.into());
        Ok(parts)
    }

    /// Sends `request` over the pooled client for `connect`, or to the
    /// local service.
    async fn send(
        &self,
        request: Request<Body>,
        connect: Duration,
    ) -> Result<Response<Body>, SendError> {
        if let Some(local) = &self.local {
            return call_local(local.clone(), request)
                .await
                .map_err(|e| SendError::Other(e.to_string()));
        }
        match self.client(connect).request(request).await {
            Ok(response) => Ok(response.map(|body| body.map_err(Into::into).boxed())),
            Err(error) if error.is_connect() => Err(SendError::Connect(
                std::error::Error::source(&error).map(ToString::to_string),
            )),
            Err(error) => Err(SendError::Other(error.to_string())),
        }
    }
}

/// The local service's answer, as a boxed future of its own.
fn call_local(
    service: LocalService,
    request: Request<Body>,
) -> futures_util::future::BoxFuture<
    'static,
    Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>>,
> {
    Box::pin(tower::ServiceExt::oneshot(service, request))
}

/// Why no response came back.
#[derive(Debug)]
enum SendError {
    /// The connection could not be made (the cause, when known).
    Connect(Option<String>),
    /// The request failed after connecting.
    Other(String),
}

impl SendError {
    fn describe(self, authority: &http::uri::Authority) -> String {
        match self {
            SendError::Connect(Some(cause)) => format!("connect to {authority} failed: {cause}"),
            SendError::Connect(None) => format!("connect to {authority} failed"),
            SendError::Other(reason) => reason,
        }
    }
}

/// A response cut by one of the request's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeadlineExceeded {
    /// No chunk came within the idle deadline.
    #[error("no chunk from the replica within the idle timeout")]
    Idle,
    /// The request's total deadline passed.
    #[error("the request's total timeout passed")]
    Total,
}

pin_project_lite::pin_project! {
    /// A response body cut off when no chunk comes for `idle` or the
    /// request's total deadline passes; dropping the upstream body then
    /// closes the replica's connection, so the engine stops generating.
    pub struct TimedBody {
        #[pin]
        inner: Body,
        idle: Option<Duration>,
        #[pin]
        next_chunk: tokio::time::Sleep,
        #[pin]
        total: tokio::time::Sleep,
        has_total: bool,
    }
}

impl TimedBody {
    /// Wraps `inner`.
    pub fn new(inner: Body, idle: Option<Duration>, total: Option<tokio::time::Instant>) -> Self {
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        Self {
            inner,
            idle,
            next_chunk: tokio::time::sleep_until(
                idle.map_or(far, |i| tokio::time::Instant::now() + i),
            ),
            total: tokio::time::sleep_until(total.unwrap_or(far)),
            has_total: total.is_some(),
        }
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = infermesh_runtime::http::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(idle) = *this.idle {
                    this.next_chunk
                        .as_mut()
                        .reset(tokio::time::Instant::now() + idle);
                }
                return Poll::Ready(frame);
            }
            Poll::Pending => {}
        }
        if this.idle.is_some() && this.next_chunk.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(DeadlineExceeded::Idle))));
        }
        if *this.has_total && this.total.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(DeadlineExceeded::Total))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
