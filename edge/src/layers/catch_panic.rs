//! The outermost guard: a request whose handling panics gets an
//! OpenAI-style 500, the panic is logged and counted
//! (`infermesh_edge_panics_total`), and the process and its other requests
//! carry on. Without it the panic would end the connection's task and the
//! client would see the connection drop.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode, header};
use infermesh_runtime::http::{Body, full};
use prometheus::IntCounter;
use tower::{Layer, Service};

/// Adds [`CatchPanic`] around a service.
#[derive(Clone, Default)]
pub struct CatchPanicLayer {
    counter: Option<IntCounter>,
}

impl CatchPanicLayer {
    /// Counts caught panics in `counter`.
    pub fn counted_in(counter: IntCounter) -> Self {
        Self {
            counter: Some(counter),
        }
    }
}

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic {
            inner,
            counter: self.counter.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
    counter: Option<IntCounter>,
}

impl<S, B> Service<Request<B>> for CatchPanic<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Kept for the log line of a panic; a clone shares the URI's bytes.
        let uri = request.uri().clone();
        let counter = self.counter.clone();
        // A panic while the call is being made counts the same as one in its future.
        let called = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request)));
        Box::pin(async move {
            let outcome = match called {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            match outcome {
                Ok(response) => response,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!(path = %uri.path(), panic = %message, "request handling panicked; answered 500");
                    if let Some(counter) = counter {
                        counter.inc();
                    }
                    let body = serde_json::json!({"error": {
                        "message": "the edge failed while handling this request",
                        "type": "server_error", "param": null, "code": "internal_error"}});
                    let mut response = Response::new(full(body.to_string()));
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok(response)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_request_gets_a_500_and_the_next_one_is_served() {
        let counter = IntCounter::new("panics", "panics").unwrap();
        let inner = tower::service_fn(|request: Request<()>| async move {
            if request.uri().path() == "/boom" {
                panic!("index out of bounds");
            }
            Ok::<_, Infallible>(Response::new(full("fine")))
        });
        let service = CatchPanicLayer::counted_in(counter.clone()).layer(inner);
        let request = |path: &str| Request::builder().uri(path).body(()).unwrap();
        let failed = service.clone().oneshot(request("/boom")).await.unwrap();
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = failed.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        assert_eq!(counter.get(), 1);
        let served = service.oneshot(request("/ok")).await.unwrap();
        assert_eq!(served.status(), StatusCode::OK);
    }
}
