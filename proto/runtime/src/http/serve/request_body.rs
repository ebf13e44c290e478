//! The body of every request `serve` hands to its service: hyper's body,
//! counted as open on its connection until it ends or is dropped (so the
//! connection never rests while a handler may still read from it), and
//! bounded in time: the whole body must arrive within the listener's
//! `body_timeout` of its head. A per-read idle timeout would not do: a
//! client trickling one byte a second never goes idle, and would hold the
//! connection and whatever was buffered so far for as long as it likes.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::activity::Busy;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed or the client sent a malformed body.
    #[error(transparent)]
    Read(#[from] hyper::Error),
    /// The body did not arrive whole within the listener's body deadline.
    #[error("the request body did not arrive within {}s", .0.as_secs_f64())]
    TimedOut(Duration),
}

/// See the module docs.
pub struct RequestBody {
    inner: Incoming,
    open: Option<Busy>,
    /// Armed only for bodies that are not already complete, so requests
    /// without a body pay nothing.
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
}

impl RequestBody {
    pub(super) fn new(inner: Incoming, open: Busy, timeout: Duration) -> Self {
        let deadline = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep(timeout)));
        Self {
            inner,
            open: Some(open),
            deadline,
            timeout,
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(open) = &self.open
            && !self.inner.is_end_stream()
        {
            open.left_unread();
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.open.take();
                self.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                self.open.take();
                self.deadline = None;
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => {
                let timeout = self.timeout;
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Some(Err(BodyError::TimedOut(timeout))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("open", &self.open.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::http::serve::test_server::{echo_server, request, response};

    #[tokio::test]
    async fn an_unread_body_is_never_taken_for_the_next_request() {
        let (addr, cancel, task) = echo_server(
            Duration::from_secs(5),
            (Duration::ZERO, 128),
            Arc::default(),
        )
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut pending = Vec::new();
        // The body of /early arrives after its answer: hyper must drain it
        // or close, never parse it as a request.
        let early = "POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 80\r\n\r\n";
        stream.write_all(early.as_bytes()).await.unwrap();
        let (status, answer, _) = response(&mut stream, &mut pending).await.unwrap();
        assert_eq!((status, answer.as_str()), (200, "early"));
        let smuggled = request("GET", "/smuggled", "");
        let body = format!("{smuggled}{}", "y".repeat(80 - smuggled.len()));
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream
            .write_all(request("GET", "/next", "").as_bytes())
            .await;
        match response(&mut stream, &mut pending).await {
            None => {}
            Some((status, answer, _)) => {
                assert_eq!((status, answer.as_str()), (200, "GET /next 0"))
            }
        }
        cancel.cancel();
        task.await.unwrap();
    }
}
