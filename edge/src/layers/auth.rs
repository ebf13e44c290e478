//! Authenticates every request except the probes against the keys of the
//! routing table held now, before the body is read, so that a caller
//! without a valid key cannot make the edge buffer anything. The
//! authenticated [`Principal`] rides in the request's extensions. Failures
//! are counted and limited per source address (`auth_failures`).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use infermesh_runtime::http::{Body, DISCARD_LIMIT, discard_body};
use infermesh_runtime::time::now_unix_ms;
use tower::{Layer, Service};

use std::sync::Arc;

use infermesh_runtime::http::ClientAddr;

use super::auth_failures::AuthFailures;
use crate::access::Principal;
use crate::access_log::{AccessRecord, millis};
use crate::error::ApiError;
use crate::gateway::Tables;
use crate::metrics::Observer;
use crate::quota::Limiter;

/// Paths open without a key: Kubernetes probes.
fn is_probe(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz")
}

/// Adds [`Auth`] around a service.
#[derive(Clone)]
pub struct AuthLayer {
    tables: Tables,
    allow_anonymous: bool,
    failures: Arc<AuthFailures>,
    observer: Option<Observer>,
    limiter: Option<Arc<Limiter>>,
}

impl AuthLayer {
    /// Checks keys from `tables`; with `allow_anonymous`, requests that
    /// present no key pass without a principal (and without limits).
    pub fn new(tables: Tables, allow_anonymous: bool) -> Self {
        Self {
            tables,
            allow_anonymous,
            failures: Arc::new(AuthFailures::new(0)),
            observer: None,
            limiter: None,
        }
    }

    /// Counts a refusal of a key `limiter` recognised (an expired one)
    /// against the key's request limit.
    pub fn counting_in(mut self, limiter: Arc<Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Writes every refused request to the access log and the request
    /// metrics of `observer` (error `unauthorized` or `auth_failures`).
    pub fn observed_by(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Counts and limits failures per source address with `failures`.
    pub fn limiting_failures(mut self, failures: AuthFailures) -> Self {
        self.failures = Arc::new(failures);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tables: self.tables.clone(),
            allow_anonymous: self.allow_anonymous,
            failures: self.failures.clone(),
            observer: self.observer.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tables: Tables,
    allow_anonymous: bool,
    failures: Arc<AuthFailures>,
    observer: Option<Observer>,
    limiter: Option<Arc<Limiter>>,
}

fn presents_a_key(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key("x-api-key")
}

impl<S> Auth<S> {
    fn principal(&self, headers: &http::HeaderMap) -> Result<Option<Principal>, ApiError> {
        if self.allow_anonymous && !presents_a_key(headers) {
            return Ok(None);
        }
        let table = self.tables.borrow().clone().ok_or(ApiError::NotReady)?;
        match table.table.access.check(headers, now_unix_ms()) {
            Ok(principal) => Ok(Some(principal)),
            Err((error, recognised)) => {
                if let (Some(principal), Some(limiter)) = (recognised, &self.limiter) {
                    limiter.count_request(&principal);
                }
                Err(error)
            }
        }
    }
}

/// Answers `error` once the request's body is read (bounded) or dropped,
/// and records it with `observer`.
fn refuse<B>(
    request: Request<B>,
    error: ApiError,
    observer: Option<Observer>,
) -> BoxFuture<'static, Result<Response<Body>, Infallible>>
where
    B: http_body::Body + Send + 'static,
{
    let started = tokio::time::Instant::now();
    let mut record = AccessRecord::begin(&request);
    Box::pin(async move {
        discard_body(request.into_body(), DISCARD_LIMIT).await;
        let outcome = match &error {
            ApiError::RateLimited { .. } => "auth_failures",
            ApiError::NotReady => "not_ready",
            _ => "unauthorized",
        };
        let response = error.into_response();
        if let Some(observer) = observer {
            record.status = response.status().as_u16();
            record.error = Some(outcome.to_string());
            record.total_ms = millis(started.elapsed());
            observer.finished(&record);
        }
        Ok(response)
    })
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Send,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if is_probe(request.uri().path()) {
            return self.inner.call(request).boxed();
        }
        let source = request.extensions().get::<ClientAddr>().map(|a| a.0.ip());
        if let Some(retry) = source.and_then(|ip| self.failures.blocked(ip)) {
            return refuse(request, too_many_failures(retry), self.observer.clone());
        }
        match self.principal(request.headers()) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                self.inner.call(request).boxed()
            }
            Err(error) => {
                if let ApiError::Unauthorized(reason) = &error {
                    // The reason names at most the claimed key id, never a secret.
                    tracing::info!(client = ?source, %reason, "authentication failed");
                    self.failures.failed(source);
                }
                refuse(request, error, self.observer.clone())
            }
        }
    }
}
/// The 429 a source gets once it has used up its failed attempts.
fn too_many_failures(retry: std::time::Duration) -> ApiError {
    let seconds = retry.as_secs().max(1);
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
    ApiError::RateLimited {
        message: format!(
            "too many failed authentication attempts from this address; retry after {seconds} s"
        ),
        kind: "auth_failures",
        headers: Box::new(headers),
    }
}
