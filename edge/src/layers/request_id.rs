//! Gives every request an `x-request-id` (keeping a sane one the client
//! sent) and echoes it on the response, so one id follows a request from
//! client to engine and back.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

/// The header carrying the id.
pub const REQUEST_ID: &str = "x-request-id";

/// Adds [`RequestId`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

fn acceptable(value: &HeaderValue) -> bool {
    let len = value.len();
    (1..=128).contains(&len)
        && value
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

impl<S, B, RB> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = match request.headers().get(REQUEST_ID) {
            Some(v) if acceptable(v) => v.clone(),
            _ => HeaderValue::try_from(new_id())
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
        };
        request.headers_mut().insert(REQUEST_ID, id.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            response.headers_mut().insert(REQUEST_ID, id);
            Ok(response)
        })
    }
}

/// 128 random bits as 32 hex digits (a UUID v4's randomness), from the
/// thread's generator: no system call per request.
fn new_id() -> String {
    use rand::Rng as _;
    format!("{:032x}", rand::rng().random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    async fn echo(request: Request<()>) -> Result<Response<String>, Infallible> {
        let seen = request
            .headers()
            .get(REQUEST_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        Ok(Response::new(seen))
    }

    #[tokio::test]
    async fn a_missing_id_is_generated_and_echoed() {
        let svc = RequestIdLayer.layer(tower::service_fn(echo));
        let response = svc.oneshot(Request::new(())).await.unwrap();
        let header = response.headers()[REQUEST_ID].to_str().unwrap().to_string();
        assert_eq!(header.len(), 32);
        assert_eq!(response.body(), &header, "upstream saw the same id");
    }

    #[tokio::test]
    async fn a_client_id_is_kept_and_a_hostile_one_replaced() {
        let svc = RequestIdLayer.layer(tower::service_fn(echo));
        let request = Request::builder()
            .header(REQUEST_ID, "abc-123")
            .body(())
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID], "abc-123");
        let request = Request::builder()
            .header(REQUEST_ID, "a b\"<script>")
            .body(())
            .unwrap();
        let response = svc.oneshot(request).await.unwrap();
        assert_ne!(response.headers()[REQUEST_ID], "a b\"<script>");
    }
}
