//! Keep-alives for streamed requests the edge holds: a streamed request
//! waiting for its turn in a full model's queue, or for a pool to scale up
//! from zero, would send nothing for as long as it waits, and proxies and
//! clients between the edge and the caller drop connections idle for a
//! minute. Once such a wait has lasted `--sse-keepalive-ms`, the edge
//! answers 200 with `text/event-stream` and sends an SSE comment
//! (`: waiting`) at that interval until the request goes out; the engine's
//! stream follows. A refusal after that point (the queue deadline, the
//! cold-start timeout) can no longer change the status: it comes as an
//! error event, in the form a stream cut short has, then the stream ends.
//!
//! Waits shorter than the interval are answered as before, so a request
//! refused within it still gets its 503 and `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use infermesh_runtime::http::{Body, BoxError};
use tokio::sync::{mpsc, watch};

/// How long a streamed request waits before keep-alives begin, by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The comment sent while a request waits.
const COMMENT: &[u8] = b": waiting\n\n";
/// Frames buffered between the task running the request and the client.
const BUFFERED_FRAMES: usize = 16;

/// Whether the request is in a wait a keep-alive should cover. Put in the
/// request's extensions by the service; stages that hold a streamed
/// request mark it while they do.
#[derive(Debug, Clone)]
pub struct Hold(Arc<watch::Sender<bool>>);

impl Default for Hold {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }
}

/// Marks a wait until dropped.
#[derive(Debug)]
pub struct Waiting(Arc<watch::Sender<bool>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

impl Hold {
    /// Marks the request as waiting until the guard drops, when it is streamed.
    pub fn waiting(&self, stream: bool) -> Option<Waiting> {
        stream.then(|| {
            self.0.send_replace(true);
            Waiting(self.0.clone())
        })
    }

    /// Resolves once the request has waited `interval` without a break.
    pub async fn held_for(&self, interval: Duration) {
        let mut seen = self.0.subscribe();
        loop {
            // The sender lives as long as this hold, so waits end only by
            // the value changing.
            let _ = seen.wait_for(|waiting| *waiting).await.is_ok();
            let ended = async {
                let _ = seen.wait_for(|waiting| !*waiting).await.is_ok();
            };
            tokio::select! {
                () = tokio::time::sleep(interval) => return,
                () = ended => {}
            }
        }
    }
}

/// Answers 200 with an event stream at once: `: waiting` comments every
/// `interval` until `pending` has the real response, then its body (or,
/// for a refusal, an error event). A client that goes away drops
/// `pending`, which cancels the request.
pub fn stream(pending: BoxFuture<'static, Response<Body>>, interval: Duration) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(BUFFERED_FRAMES);
    tokio::spawn(async move {
        let mut pending = pending;
        let mut tick = tokio::time::interval(interval);
        let response = loop {
            tokio::select! {
                response = &mut pending => break response,
                _ = tick.tick() => {
                    if tx.send(Ok(http_body::Frame::data(Bytes::from_static(COMMENT)))).await.is_err() {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        };
        let streamed = response.status() == StatusCode::OK
            && response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
        let status = response.status();
        let mut body = response.into_body();
        if !streamed {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let _ = tx
                .send(Ok(http_body::Frame::data(refusal_event(status, &text))))
                .await;
            return;
        }
        while let Some(frame) = body.frame().await {
            let last = frame.is_err();
            if tx.send(frame).await.is_err() || last {
                return;
            }
        }
    });
    let mut rx = rx;
    let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    response
}

/// The error event for a response that was not a stream: its OpenAI error
/// JSON as it is, or one naming its status.
fn refusal_event(status: StatusCode, body: &[u8]) -> Bytes {
    let event = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) if value.get("error").is_some() => value,
        _ => serde_json::json!({"error": {
            "message": format!("the request ended with status {status} after waiting"),
            "type": "server_error", "param": null, "code": "upstream_error"}}),
    };
    let mut out = BytesMut::new();
    crate::sse::write_event(&mut out, event.to_string().as_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_runtime::http::full;

    async fn text(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_fires_only_after_an_unbroken_wait() {
        let hold = Hold::default();
        let interval = Duration::from_secs(10);
        let fired = tokio::spawn({
            let hold = hold.clone();
            async move { hold.held_for(interval).await }
        });
        assert!(
            hold.waiting(false).is_none(),
            "unstreamed requests are not held"
        );
        let short = hold.waiting(true);
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(short);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!fired.is_finished(), "two short waits are not one long one");
        let _long = hold.waiting(true);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(fired.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn comments_flow_until_the_answer_then_its_stream_follows() {
        let pending: BoxFuture<'static, Response<Body>> = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(25)).await;
            let mut response = Response::new(full("data: {\"x\":1}\n\ndata: [DONE]\n\n"));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            response
        });
        let response = stream(pending, Duration::from_secs(10));
        assert_eq!(response.status(), StatusCode::OK);
        let body = text(response).await;
        assert_eq!(
            body,
            ": waiting\n\n: waiting\n\n: waiting\n\ndata: {\"x\":1}\n\ndata: [DONE]\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_after_the_commitment_is_an_error_event() {
        let pending: BoxFuture<'static, Response<Body>> = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut response = Response::new(full(
                r#"{"error":{"message":"no replica had room","type":"server_error","param":null,"code":"overloaded"}}"#,
            ));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
        });
        let body = text(stream(pending, Duration::from_secs(10))).await;
        assert!(body.starts_with(": waiting\n\ndata: {\"error\""), "{body}");
        assert!(body.contains("\"code\":\"overloaded\""), "{body}");
        assert!(body.ends_with("\n\n"));
    }
}
