//! Reads the request body into memory up to a limit (routing needs the
//! `model` field, so bodies are small JSON documents), answering 413 past
//! it and 408 when it does not arrive within the listener's body deadline.
//! Probes (`GET`/`HEAD` `/livez`, `/readyz`) are answered without reading
//! any body: they skip authentication, so reading one would let anyone
//! hold memory with no key. Everything after this layer sees
//! `Request<Bytes>`.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as HttpBody;
use infermesh_runtime::http::{Body, BodyError};
use tower::{Layer, Service};

use crate::error::ApiError;

/// Adds [`BodyLimit`] around a service.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    limit: usize,
}

impl BodyLimitLayer {
    /// Bodies above `limit` bytes are refused.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    limit: usize,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<Bytes>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = self.limit;
        // The clone is the one that was polled ready; keep it for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            if is_probe(&parts.method, parts.uri.path()) {
                let unread = !body.is_end_stream();
                drop(body);
                let mut response = inner.call(Request::from_parts(parts, Bytes::new())).await?;
                if unread {
                    // The unread body must not be taken for the next request.
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                return Ok(response);
            }
            if body.size_hint().lower() > limit as u64 {
                // Read a little of it, so that a small excess still gets its 413.
                infermesh_runtime::http::discard_body(body, infermesh_runtime::http::DISCARD_LIMIT)
                    .await;
                return Ok(ApiError::BodyTooLarge { limit }.into_response());
            }
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    return Ok(ApiError::BodyTooLarge { limit }.into_response());
                }
                Err(error) => {
                    if let Some(BodyError::TimedOut(after)) = error.downcast_ref::<BodyError>() {
                        return Ok(ApiError::BodyTimeout { after: *after }.into_response());
                    }
                    return Ok(ApiError::InvalidRequest {
                        message: format!("could not read the request body: {error}"),
                        param: None,
                    }
                    .into_response());
                }
            };
            inner.call(Request::from_parts(parts, bytes)).await
        })
    }
}

/// Kubernetes probes: answered from the edge's own state, never with a body.
fn is_probe(method: &http::Method, path: &str) -> bool {
    matches!(*method, http::Method::GET | http::Method::HEAD)
        && matches!(path, "/livez" | "/readyz")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use http_body_util::Full;
    use tower::ServiceExt;

    fn svc() -> impl Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Infallible> {
        BodyLimitLayer::new(8).layer(tower::service_fn(|r: Request<Bytes>| async move {
            Ok::<_, Infallible>(Response::new(infermesh_runtime::http::full(r.into_body())))
        }))
    }

    #[tokio::test]
    async fn bodies_within_the_limit_pass_whole() {
        let response = svc()
            .oneshot(Request::new(Full::new(Bytes::from("12345678"))))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"12345678");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_get_413() {
        let response = svc()
            .oneshot(Request::new(Full::new(Bytes::from("123456789"))))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    type Frames =
        futures_util::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, BodyError>>;
    type Streamed = Request<http_body_util::StreamBody<Frames>>;

    fn echo_path() -> impl Service<Streamed, Response = Response<Body>, Error = Infallible> {
        BodyLimitLayer::new(8).layer(tower::service_fn(|r: Request<Bytes>| async move {
            let seen = format!("{} {}", r.uri().path(), r.body().len());
            Ok::<_, Infallible>(Response::new(infermesh_runtime::http::full(seen)))
        }))
    }

    fn request(method: http::Method, path: &str, frames: Frames) -> Streamed {
        Request::builder()
            .method(method)
            .uri(path)
            .body(http_body_util::StreamBody::new(frames))
            .unwrap()
    }

    #[tokio::test]
    async fn probes_are_answered_without_waiting_for_a_body_that_never_ends() {
        use futures_util::StreamExt;
        let never = futures_util::stream::pending().boxed();
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            echo_path().oneshot(request(http::Method::GET, "/readyz", never)),
        )
        .await
        .expect("answered without reading the body")
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[http::header::CONNECTION], "close");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"/readyz 0");
    }

    #[tokio::test]
    async fn a_body_past_its_deadline_gets_408_and_closes_the_connection() {
        use futures_util::StreamExt;
        let frames = futures_util::stream::iter([
            Ok(http_body::Frame::data(Bytes::from_static(b"{"))),
            Err(BodyError::TimedOut(std::time::Duration::from_secs(3))),
        ])
        .boxed();
        let response = echo_path()
            .oneshot(request(http::Method::POST, "/v1/chat/completions", frames))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(response.headers()[http::header::CONNECTION], "close");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "request_timeout");
    }
}
