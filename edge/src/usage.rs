//! Watches a response body on its way to the client, without holding it
//! back: finds the engine's `usage` (the JSON body, or the final SSE chunk
//! that `stream_options.include_usage` asks for), removes that chunk again
//! when the edge asked for it and the client did not, times the first
//! byte, and when the body ends settles the rate-limit reservation and
//! writes the access-log line.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use infermesh_runtime::http::{Body, BoxError};

use crate::access_log::{AccessRecord, millis};
use crate::metrics::{InFlight, Observer};
use crate::quota::Admission;

/// Non-streamed bodies larger than this are passed on without looking for usage.
const JSON_SCAN_LIMIT: usize = 4 * 1024 * 1024;

/// Token counts from an engine's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
}

fn usage_of(value: &serde_json::Value) -> Option<Usage> {
    let usage = value.get("usage")?;
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let completion = usage
        .get("completion_tokens")
        .and_then(|c| c.as_u64())
        .unwrap_or(0);
    Some(Usage { prompt, completion })
}

enum Mode {
    Json(Vec<u8>),
    Sse { pending: BytesMut, strip: bool },
}

/// What happens when the body ends.
pub struct Finish {
    /// The reservation to settle, if the request was rate limited.
    pub admission: Option<Admission>,
    /// The access-log line to complete.
    pub record: AccessRecord,
    /// Where the finished record goes.
    pub observer: Observer,
    /// Holds the request in the in-flight gauge until the body ends.
    pub in_flight: Option<InFlight>,
    /// The request's server span, which ends with the body.
    pub span: tracing::Span,
    /// When the request arrived.
    pub started: Instant,
    /// Whether the engine answered with an error status.
    pub failed: bool,
}

/// See the module docs.
pub struct UsageTap {
    inner: Body,
    mode: Mode,
    usage: Option<Usage>,
    finish: Option<Finish>,
    /// The stream was cut and its closing error event sent: nothing follows.
    closed: bool,
}

/// `error` in the access log and the request metrics of a response the
/// replica stopped sending partway (a timeout between chunks, a lost
/// connection).
pub const UPSTREAM_CUT: &str = "upstream_cut";
/// `error` of a response whose client went away before its end.
pub const CLIENT_CANCELLED: &str = "client_cancelled";

/// The last event of a stream the replica cut: an OpenAI-style error, so
/// that clients see why it ended instead of a dropped connection.
fn cut_event(reason: &str) -> Bytes {
    let event = serde_json::json!({"error": {
        "message": format!("the replica stopped sending: {reason}"),
        "type": "server_error", "param": null, "code": UPSTREAM_CUT}});
    Bytes::from(format!("data: {event}\n\n"))
}

impl UsageTap {
    /// Taps `inner`; `sse` for event streams, `strip` to remove the usage
    /// chunk the client did not ask for.
    pub fn new(inner: Body, sse: bool, strip: bool, finish: Finish) -> Self {
        let mode = if sse {
            Mode::Sse {
                pending: BytesMut::new(),
                strip,
            }
        } else {
            Mode::Json(Vec::new())
        };
        Self {
            inner,
            mode,
            usage: None,
            finish: Some(finish),
            closed: false,
        }
    }

    /// Passes SSE events through as they complete; returns what to send now.
    fn sse(&mut self, data: Bytes) -> Bytes {
        let Mode::Sse { pending, strip } = &mut self.mode else {
            return data;
        };
        pending.extend_from_slice(&data);
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(pending) {
            let event = pending.split_to(end);
            // Only the usage chunk (and, when stripping, chunks carrying
            // `"usage":null`) need decoding; every other event passes as bytes.
            if !crate::openai::contains_bytes(&event, b"\"usage\"") {
                out.extend_from_slice(&event);
                continue;
            }
            let text = String::from_utf8_lossy(&event);
            let payload = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect::<String>();
            if payload != "[DONE]" {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&payload)
                    && let Some(usage) = usage_of(&value)
                {
                    self.usage = Some(usage);
                    let no_choices = value
                        .get("choices")
                        .and_then(|c| c.as_array())
                        .is_none_or(|c| c.is_empty());
                    if *strip && no_choices {
                        continue;
                    }
                }
                if *strip {
                    let cleaned = text.replace(",\"usage\":null", "");
                    out.extend_from_slice(cleaned.as_bytes());
                    continue;
                }
            }
            out.extend_from_slice(&event);
        }
        out.freeze()
    }

    fn end(&mut self) {
        let Some(mut finish) = self.finish.take() else {
            return;
        };
        if let Mode::Json(buf) = &self.mode
            && let Ok(value) = serde_json::from_slice::<serde_json::Value>(buf)
        {
            self.usage = usage_of(&value);
        }
        if let Mode::Sse { pending, .. } = &self.mode
            && !pending.is_empty()
        {
            tracing::debug!(bytes = pending.len(), "stream ended inside an event");
        }
        if let Some(usage) = self.usage {
            finish.record.tokens_in = Some(usage.prompt);
            finish.record.tokens_out = Some(usage.completion);
        }
        if let Some(admission) = finish.admission.take() {
            match (self.usage, finish.failed) {
                (Some(usage), _) => admission.settle(usage.prompt + usage.completion),
                (None, true) => admission.settle(0),
                // No usage from a cut-short stream: the reservation stands.
                (None, false) => {}
            }
        }
        finish.record.total_ms = millis(finish.started.elapsed());
        finish.observer.finished(&finish.record);
    }
}

/// The end of the first complete event (after its blank line), if any.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl HttpBody for UsageTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(None);
        }
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    if let Mode::Sse { pending, .. } = &mut this.mode
                        && !pending.is_empty()
                    {
                        let rest = pending.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    this.end();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "the replica's response was cut short");
                    if let Some(finish) = &mut this.finish {
                        finish.record.error = Some(UPSTREAM_CUT.into());
                    }
                    this.end();
                    if matches!(this.mode, Mode::Sse { .. }) {
                        // A stream ends with an error event the client can read.
                        this.closed = true;
                        return Poll::Ready(Some(Ok(Frame::data(cut_event(&e.to_string())))));
                    }
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            if let Some(finish) = &mut this.finish
                                && finish.record.ttft_ms.is_none()
                                && !data.is_empty()
                            {
                                finish.record.ttft_ms = Some(millis(finish.started.elapsed()));
                            }
                            let data = match &mut this.mode {
                                Mode::Json(buf) => {
                                    if buf.len() + data.len() <= JSON_SCAN_LIMIT {
                                        buf.extend_from_slice(&data);
                                    }
                                    data
                                }
                                Mode::Sse { .. } => this.sse(data),
                            };
                            if data.is_empty() {
                                continue;
                            }
                            // A body of known length is whole once its last
                            // frame is out; the server need not poll again.
                            if matches!(this.mode, Mode::Json(_)) && this.inner.is_end_stream() {
                                this.end();
                            }
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    Poll::Ready(Some(Ok(frame)))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            Mode::Json(_) => self.inner.size_hint(),
            Mode::Sse { .. } => SizeHint::default(),
        }
    }
}

impl Drop for UsageTap {
    fn drop(&mut self) {
        // A client that went away still gets its line, and its reservation stands.
        if let Some(finish) = &mut self.finish
            && finish.record.error.is_none()
        {
            finish.record.error = Some(CLIENT_CANCELLED.into());
        }
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use infermesh_runtime::http::full;

    fn finish() -> Finish {
        Finish {
            admission: None,
            record: AccessRecord::default(),
            observer: Observer::disabled(),
            in_flight: None,
            span: tracing::Span::none(),
            started: Instant::now(),
            failed: false,
        }
    }

    fn chunk(content: &str) -> String {
        format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":null}}\n\n"
        )
    }

    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n";

    async fn collect(tap: UsageTap) -> String {
        String::from_utf8(tap.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_usage_chunk_the_client_did_not_ask_for_is_removed() {
        let stream = format!("{}{}{USAGE}data: [DONE]\n\n", chunk("a"), chunk("b"));
        let mut tap = UsageTap::new(full(stream), true, true, finish());
        // Split across frames at awkward places: events are re-assembled.
        let out = tap.sse(Bytes::from(chunk("a")[..10].to_string()));
        assert!(out.is_empty(), "a partial event is held back");
        let tap = UsageTap::new(
            full(format!(
                "{}{}{USAGE}data: [DONE]\n\n",
                chunk("a"),
                chunk("b")
            )),
            true,
            true,
            finish(),
        );
        let body = collect(tap).await;
        assert!(!body.contains("usage"), "{body}");
        assert!(body.contains("\"content\":\"a\"") && body.ends_with("data: [DONE]\n\n"));
        drop(tap_with_usage_kept().await);
    }

    async fn tap_with_usage_kept() -> String {
        let stream = format!("{}{USAGE}data: [DONE]\n\n", chunk("a"));
        let body = collect(UsageTap::new(full(stream.clone()), true, false, finish())).await;
        assert_eq!(
            body, stream,
            "a client that asked gets the stream byte for byte"
        );
        body
    }

    #[tokio::test]
    async fn a_stream_the_replica_cuts_ends_with_an_error_event() {
        let first = Bytes::from(chunk("a"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(first)),
            Err("no chunk from the replica within the idle timeout".into()),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut tap = UsageTap::new(http_body_util::BodyExt::boxed(inner), true, true, finish());
        let mut body = String::new();
        while let Some(frame) = tap.frame().await {
            let frame = frame.expect("the cut is an event, not an error");
            body.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
        assert!(body.starts_with("data: {\"id\""), "{body}");
        let last = body.lines().rfind(|l| l.starts_with("data:")).unwrap();
        let event: serde_json::Value =
            serde_json::from_str(last.trim_start_matches("data: ")).unwrap();
        assert_eq!(event["error"]["code"], UPSTREAM_CUT, "{body}");
        assert!(tap.finish.is_none(), "the request was accounted once");
    }

    #[tokio::test]
    async fn usage_is_found_in_json_bodies_and_streams() {
        let mut tap = UsageTap::new(full(USAGE.to_string()), true, false, finish());
        tap.sse(Bytes::from(USAGE));
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt: 7,
                completion: 2
            })
        );
        let json = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let mut tap = UsageTap::new(full(json), false, false, finish());
        while tap.frame().await.is_some() {}
        tap.end_for_test();
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt: 3,
                completion: 4
            })
        );
    }

    impl UsageTap {
        fn end_for_test(&mut self) {
            if let Mode::Json(buf) = &self.mode {
                self.usage = serde_json::from_slice(buf).ok().as_ref().and_then(usage_of);
            }
        }
    }
}
