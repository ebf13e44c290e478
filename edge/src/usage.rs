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
use crate::quota::{Admission, Used};
use crate::sse::{Event, Framer, Part};

/// Non-streamed bodies up to this size are read whole for their usage;
/// past it, only the last `JSON_TAIL` bytes are kept, where engines write
/// `usage` (after the choices).
const JSON_SCAN_LIMIT: usize = 4 * 1024 * 1024;
/// Bytes of a larger body's end kept to find its usage in.
const JSON_TAIL: usize = 64 * 1024;

/// The usage in the last bytes of a JSON body: the value of its last
/// `"usage"` member.
fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    let at = memchr::memmem::rfind(tail, b"\"usage\"")?;
    let rest = tail[at + b"\"usage\"".len()..].trim_ascii_start();
    let rest = rest.strip_prefix(b":")?;
    let value = serde_json::Deserializer::from_slice(rest)
        .into_iter::<serde_json::Value>()
        .next()?
        .ok()?;
    usage_of(&serde_json::json!({ "usage": value }))
}

/// Token counts from an engine's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
}

/// The usage an answer or event reports: OpenAI's `usage` (prompt and
/// completion tokens, or only a total for rerank and score), the Responses API's `response.usage` and
/// Anthropic's `message.usage` (input and output tokens).
fn usage_of(value: &serde_json::Value) -> Option<Usage> {
    let usage = ["usage", "response", "message"]
        .iter()
        .find_map(|at| match *at {
            "usage" => value.get("usage"),
            nested => value.get(nested)?.get("usage"),
        })
        .filter(|u| u.is_object())?;
    let count = |names: [&str; 2]| names.iter().find_map(|n| usage.get(*n)?.as_u64());
    let completion = count(["completion_tokens", "output_tokens"]);
    // Rerank and score report only a total, all of it input.
    let prompt = count(["prompt_tokens", "input_tokens"]).or_else(|| {
        completion
            .is_none()
            .then(|| count(["total_tokens", "total_tokens"]))?
    });
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    Some(Usage {
        prompt: prompt.unwrap_or(0),
        completion: completion.unwrap_or(0),
    })
}

impl Usage {
    /// Counts reported in pieces over a stream (Anthropic reports input
    /// tokens at the start and output tokens at the end): the largest of each.
    fn merged(self, earlier: Option<Usage>) -> Usage {
        match earlier {
            None => self,
            Some(e) => Usage {
                prompt: self.prompt.max(e.prompt),
                completion: self.completion.max(e.completion),
            },
        }
    }
}

enum Mode {
    Json {
        /// The body, while it is within JSON_SCAN_LIMIT.
        whole: Vec<u8>,
        /// Its last JSON_TAIL bytes, once it is not.
        tail: Option<Vec<u8>>,
    },
    Sse {
        framer: Framer,
        strip: bool,
        /// The last event was the usage chunk, removed: the LF that may
        /// still follow its CR goes with it.
        removed: bool,
        /// While stripping: the chunks that finished a choice, held until
        /// the next event. vLLM writes `system_fingerprint` on the usage
        /// chunk alone when the request asked for usage, and on the
        /// finishing chunks otherwise; when the usage chunk the edge asked
        /// for is removed, its fingerprint goes onto them.
        held: Vec<Bytes>,
    },
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
    /// Its turn at a full model: the next waiter goes when the body ends.
    pub ticket: Option<crate::flow::Ticket>,
    /// The request's server span, which ends with the body.
    pub span: tracing::Span,
    /// When the request arrived.
    pub started: Instant,
    /// Whether the engine answered with an error status.
    pub failed: bool,
    /// The prompt tokens the admission estimated: what a request cut short
    /// without a usage report is charged, with what was streamed.
    pub prompt_estimate: u64,
}

/// See the module docs.
pub struct UsageTap {
    inner: Body,
    mode: Mode,
    usage: Option<Usage>,
    finish: Option<Finish>,
    /// The stream was cut and its closing error event sent: nothing follows.
    closed: bool,
    /// Chunks of generated output passed on (about a token each).
    chunks: u64,
    /// Chunks decoded as JSON, which only a non-null `usage` calls for.
    #[cfg(test)]
    decoded: usize,
}

/// `error` in the access log and the request metrics of a response the
/// replica stopped sending partway (a timeout between chunks, a lost
/// connection).
pub const UPSTREAM_CUT: &str = "upstream_cut";
/// `error` of a response whose client went away before its end.
pub const CLIENT_CANCELLED: &str = "client_cancelled";
/// The error label of a response cut by its idle or total deadline.
pub const DEADLINE: &str = "deadline";

/// The last event of a stream the replica cut: an OpenAI-style error, so
/// that clients see why it ended instead of a dropped connection.
fn cut_event(reason: &str, code: &str) -> Bytes {
    let event = serde_json::json!({"error": {
        "message": format!("the replica stopped sending: {reason}"),
        "type": "server_error", "param": null, "code": code}});
    let mut out = BytesMut::new();
    crate::sse::write_event(&mut out, event.to_string().as_bytes());
    out.freeze()
}

/// What a finished request is charged, in tokens, or `None` to let its
/// reservation stand: the engine's usage; nothing for an engine error;
/// for a response cut short (by the replica, a deadline, or the client
/// going away) before any usage, the prompt and what was streamed
/// (`produced`); a whole answer without usage keeps its reservation.
fn charge(usage: Option<Usage>, failed: bool, cut_short: bool, produced: Used) -> Option<Used> {
    match (usage, failed, cut_short) {
        (Some(usage), _, _) => Some(Used {
            prompt: usage.prompt,
            completion: usage.completion,
        }),
        (None, true, _) => Some(Used::NONE),
        (None, false, true) => Some(produced),
        (None, false, false) => None,
    }
}

/// Keeps what finding a JSON body's usage needs: the body while it is
/// within the scan limit, then its last bytes.
fn keep_for_usage(whole: &mut Vec<u8>, tail: &mut Option<Vec<u8>>, data: &[u8]) {
    if tail.is_none() && whole.len() + data.len() <= JSON_SCAN_LIMIT {
        whole.extend_from_slice(data);
        return;
    }
    let kept = tail.get_or_insert_with(|| std::mem::take(whole));
    kept.extend_from_slice(data);
    if kept.len() > 2 * JSON_TAIL {
        kept.drain(..kept.len() - JSON_TAIL);
    }
}

/// Whether a chunk finishes a choice: a `finish_reason` that is a string.
fn finishes(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"finish_reason\"";
    memchr::memmem::find_iter(data, KEY).any(|at| {
        let after = data[at + KEY.len()..].trim_ascii_start();
        after
            .strip_prefix(b":")
            .is_some_and(|value| value.trim_ascii_start().starts_with(b"\""))
    })
}

/// `event` (a chunk's raw bytes) carrying `fingerprint` as its
/// `system_fingerprint`, unless it has one already.
fn with_fingerprint(event: &Bytes, fingerprint: &str) -> Bytes {
    const NULL: &[u8] = b"\"system_fingerprint\":null";
    let value = serde_json::Value::from(fingerprint).to_string();
    if let Some(at) = memchr::memmem::find(event, NULL) {
        let mut out = BytesMut::with_capacity(event.len() + value.len());
        out.extend_from_slice(&event[..at]);
        out.extend_from_slice(b"\"system_fingerprint\":");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(&event[at + NULL.len()..]);
        return out.freeze();
    }
    if memchr::memmem::find(event, b"\"system_fingerprint\"").is_some() {
        return event.clone();
    }
    let Some(end) = memchr::memrchr(b'}', event) else {
        return event.clone();
    };
    let mut out = BytesMut::with_capacity(event.len() + value.len() + 24);
    out.extend_from_slice(&event[..end]);
    out.extend_from_slice(b",\"system_fingerprint\":");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&event[end..]);
    out.freeze()
}

/// The chunk with its `,"usage":null` taken out, for a client that did not
/// ask for usage; every other byte is kept.
fn without_null_usage(raw: &Bytes) -> Bytes {
    const NULL_USAGE: &[u8] = b",\"usage\":null";
    let mut found = memchr::memmem::find_iter(raw, NULL_USAGE).peekable();
    if found.peek().is_none() {
        return raw.clone();
    }
    let mut out = BytesMut::with_capacity(raw.len());
    let mut from = 0;
    for at in found {
        out.extend_from_slice(&raw[from..at]);
        from = at + NULL_USAGE.len();
    }
    out.extend_from_slice(&raw[from..]);
    out.freeze()
}

impl UsageTap {
    /// Taps `inner`; `sse` for event streams, `strip` to remove the usage
    /// chunk the client did not ask for.
    pub fn new(inner: Body, sse: bool, strip: bool, finish: Finish) -> Self {
        let mode = if sse {
            Mode::Sse {
                framer: Framer::default(),
                strip,
                removed: false,
                held: Vec::new(),
            }
        } else {
            Mode::Json {
                whole: Vec::new(),
                tail: None,
            }
        };
        Self {
            inner,
            mode,
            usage: None,
            finish: Some(finish),
            closed: false,
            chunks: 0,
            #[cfg(test)]
            decoded: 0,
        }
    }

    /// Passes SSE events through as they complete; returns what to send now.
    fn sse(&mut self, data: Bytes) -> Bytes {
        let Mode::Sse { framer, .. } = &mut self.mode else {
            return data;
        };
        framer.push(&data);
        let mut out = BytesMut::new();
        while let Some(part) = self.next_part() {
            if let Some(bytes) = self.pass(part) {
                out.extend_from_slice(&bytes);
            }
        }
        out.freeze()
    }

    fn next_part(&mut self) -> Option<Part> {
        match &mut self.mode {
            Mode::Sse { framer, .. } => framer.next_part(),
            Mode::Json { .. } => None,
        }
    }

    /// What of `part` goes to the client: all of it, except the usage chunk
    /// (and the `"usage":null` of the others) when stripping; chunks that
    /// finish a choice wait for the next event then.
    fn pass(&mut self, part: Part) -> Option<Bytes> {
        let event = match part {
            Part::Event(event) => event,
            Part::LineEndTail(raw) => {
                if matches!(self.mode, Mode::Sse { removed: true, .. }) {
                    return None;
                }
                if let Mode::Sse { held, .. } = &mut self.mode
                    && !held.is_empty()
                {
                    held.push(raw);
                    return None;
                }
                return Some(raw);
            }
            Part::Oversize(raw) | Part::Unfinished(raw) => {
                self.set_removed(false);
                return Some(self.released(None, raw));
            }
        };
        let strip = matches!(self.mode, Mode::Sse { strip: true, .. });
        let (usage_only, fingerprint) = self.read_usage(&event);
        if !usage_only && event.data().is_some_and(|d| d.as_ref() != b"[DONE]") {
            self.chunks += 1;
        }
        let remove = usage_only && strip;
        self.set_removed(remove);
        if remove {
            let held = self.released(fingerprint.as_deref(), Bytes::new());
            return (!held.is_empty()).then_some(held);
        }
        if !strip || event.data().is_none() {
            return Some(self.released(None, event.raw().clone()));
        }
        let chunk = without_null_usage(event.raw());
        if event.data().is_some_and(|data| finishes(data)) {
            if let Mode::Sse { held, .. } = &mut self.mode {
                held.push(chunk);
            }
            return None;
        }
        Some(self.released(None, chunk))
    }

    /// The chunks held back (given `fingerprint`, when the removed usage
    /// chunk had one), then `next`.
    fn released(&mut self, fingerprint: Option<&str>, next: Bytes) -> Bytes {
        let Mode::Sse { held, .. } = &mut self.mode else {
            return next;
        };
        if held.is_empty() {
            return next;
        }
        let mut out = BytesMut::new();
        for chunk in held.drain(..) {
            match fingerprint {
                Some(fingerprint) => out.extend_from_slice(&with_fingerprint(&chunk, fingerprint)),
                None => out.extend_from_slice(&chunk),
            }
        }
        out.extend_from_slice(&next);
        out.freeze()
    }

    /// Takes the usage from a chunk that carries one; returns whether the
    /// chunk is nothing else (no choices), i.e. the usage-only last chunk,
    /// and its `system_fingerprint`.
    fn read_usage(&mut self, event: &Event) -> (bool, Option<String>) {
        let Some(data) = event.data().filter(|_| event.carries_usage()) else {
            return (false, None);
        };
        #[cfg(test)]
        {
            self.decoded += 1;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
            return (false, None);
        };
        let Some(usage) = usage_of(&value) else {
            return (false, None);
        };
        self.usage = Some(usage.merged(self.usage));
        let usage_only = value
            .get("choices")
            .and_then(|c| c.as_array())
            .is_none_or(|c| c.is_empty());
        let fingerprint = value
            .get("system_fingerprint")
            .and_then(|f| f.as_str())
            .map(String::from);
        (usage_only, fingerprint)
    }

    fn set_removed(&mut self, now: bool) {
        if let Mode::Sse { removed, .. } = &mut self.mode {
            *removed = now;
        }
    }

    fn end(&mut self) {
        let Some(mut finish) = self.finish.take() else {
            return;
        };
        match &self.mode {
            Mode::Json {
                tail: Some(tail), ..
            } => self.usage = usage_in_tail(tail),
            Mode::Json { whole, .. } => {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(whole) {
                    self.usage = usage_of(&value);
                }
            }
            Mode::Sse { .. } => {}
        }
        if let Some(usage) = self.usage {
            finish.record.tokens_in = Some(usage.prompt);
            finish.record.tokens_out = Some(usage.completion);
        }
        if let Some(admission) = finish.admission.take() {
            let produced = Used {
                prompt: finish.prompt_estimate,
                completion: self.chunks,
            };
            let cut_short = finish.record.error.is_some();
            match charge(self.usage, finish.failed, cut_short, produced) {
                Some(used) => {
                    finish.record.spend_micros = Some(admission.cost(used));
                    admission.settle(used);
                }
                None => {
                    finish.record.spend_micros = Some(admission.reserved_spend());
                    admission.keep();
                }
            }
        }
        finish.record.total_ms = millis(finish.started.elapsed());
        finish.observer.finished(&finish.record);
    }

    /// The replica's body failed: the request is recorded as cut short, by
    /// its deadline or by the replica, and a stream gets a closing event.
    fn cut_short(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::warn!(error = %e, "the replica's response was cut short");
        let deadline = e
            .downcast_ref::<crate::forward::DeadlineExceeded>()
            .is_some();
        let label = if deadline { DEADLINE } else { UPSTREAM_CUT };
        if let Some(finish) = &mut self.finish {
            finish.record.error = Some(label.into());
        }
        self.end();
        if matches!(self.mode, Mode::Sse { .. }) {
            // A stream ends with an error event the client can read, after
            // the chunks held back.
            self.closed = true;
            let last = self.released(None, cut_event(&e.to_string(), label));
            return Poll::Ready(Some(Ok(Frame::data(last))));
        }
        Poll::Ready(Some(Err(e)))
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
                    let held = this.released(None, Bytes::new());
                    if !held.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                    if let Mode::Sse { framer, .. } = &mut this.mode
                        && let Some(rest) = framer.finish()
                    {
                        if matches!(rest, Part::Unfinished(_)) {
                            tracing::debug!(
                                bytes = rest.raw().len(),
                                "stream ended inside an event"
                            );
                        }
                        return Poll::Ready(Some(Ok(Frame::data(rest.raw().clone()))));
                    }
                    this.end();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => this.cut_short(e),
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
                                Mode::Json { whole, tail } => {
                                    keep_for_usage(whole, tail, &data);
                                    data
                                }
                                Mode::Sse { .. } => this.sse(data),
                            };
                            if data.is_empty() {
                                continue;
                            }
                            // A body of known length is whole once its last
                            // frame is out; the server need not poll again.
                            if matches!(this.mode, Mode::Json { .. }) && this.inner.is_end_stream()
                            {
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
            Mode::Json { .. } => self.inner.size_hint(),
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
            ticket: None,
            span: tracing::Span::none(),
            started: Instant::now(),
            failed: false,
            prompt_estimate: 0,
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
    async fn a_stream_cut_by_its_deadline_says_so() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from(chunk("a")))),
            Err(Box::new(crate::forward::DeadlineExceeded::Idle)),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let tap = UsageTap::new(http_body_util::BodyExt::boxed(inner), true, true, finish());
        let body = collect(tap).await;
        assert!(body.contains(r#""code":"deadline""#), "{body}");
        assert!(body.contains("idle timeout"), "{body}");
    }

    #[tokio::test]
    async fn a_stream_the_replica_cuts_ends_with_an_error_event() {
        let first = Bytes::from(chunk("a"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(first)), Err("connection reset".into())];
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

    #[test]
    fn responses_and_anthropic_usage_is_read_and_merged_over_the_stream() {
        let mut tap = UsageTap::new(full(""), true, false, finish());
        tap.sse(Bytes::from(concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\n\n",
        )));
        assert_eq!(
            tap.usage,
            Some(Usage {
                prompt: 11,
                completion: 5
            })
        );
        let completed = r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10}}}"#;
        let value: serde_json::Value = serde_json::from_str(completed).unwrap();
        assert_eq!(
            usage_of(&value),
            Some(Usage {
                prompt: 4,
                completion: 6
            })
        );
        let rerank = r#"{"results":[],"usage":{"total_tokens":9}}"#;
        assert_eq!(
            usage_of(&serde_json::from_str(rerank).unwrap()),
            Some(Usage {
                prompt: 9,
                completion: 0
            })
        );
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

    #[tokio::test]
    async fn the_usage_of_a_body_past_the_scan_limit_is_found_at_its_end() {
        let text = "x".repeat(JSON_SCAN_LIMIT + 3 * JSON_TAIL);
        let json = format!(
            r#"{{"choices":[{{"message":{{"content":"{text}"}}}}],"usage":{{"prompt_tokens":9,"completion_tokens":1200000}}}}"#
        );
        let mut tap = UsageTap::new(full(""), false, false, finish());
        for piece in json.as_bytes().chunks(100_000) {
            if let Mode::Json { whole, tail } = &mut tap.mode {
                keep_for_usage(whole, tail, piece);
            }
        }
        let Mode::Json { whole, tail } = &tap.mode else {
            unreachable!()
        };
        assert!(whole.is_empty());
        let kept = tail.as_ref().unwrap().len();
        assert!(kept <= 2 * JSON_TAIL, "bounded: {kept}");
        assert_eq!(
            usage_in_tail(tail.as_ref().unwrap()),
            Some(Usage {
                prompt: 9,
                completion: 1_200_000
            })
        );
    }

    #[test]
    fn a_response_cut_short_is_charged_its_prompt_and_what_was_streamed() {
        let usage = Some(Usage {
            prompt: 5,
            completion: 7,
        });
        let produced = Used {
            prompt: 1,
            completion: 2,
        };
        assert_eq!(
            charge(usage, false, true, produced),
            Some(Used {
                prompt: 5,
                completion: 7
            }),
            "usage wins"
        );
        assert_eq!(
            charge(None, true, false, produced),
            Some(Used::NONE),
            "engine error"
        );
        assert_eq!(
            charge(None, false, true, produced),
            Some(produced),
            "cut: prompt + streamed"
        );
        assert_eq!(
            charge(None, false, false, produced),
            None,
            "whole, no usage"
        );
        let mut tap = UsageTap::new(full(""), true, true, finish());
        tap.sse(Bytes::from(format!("{}{}", chunk("a"), chunk("b"))));
        tap.sse(Bytes::from(format!("{USAGE}data: [DONE]\n\n")));
        assert_eq!(
            tap.chunks, 2,
            "content chunks, not the usage chunk or [DONE]"
        );
    }

    #[test]
    fn only_a_chunk_with_non_null_usage_is_decoded() {
        let mut tap = UsageTap::new(full(""), true, false, finish());
        let broken =
            "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}],\"usage\":null,,,\n\n";
        let out = tap.sse(Bytes::from(format!("{}{broken}", chunk("a"))));
        assert_eq!(out, format!("{}{broken}", chunk("a")));
        assert_eq!(tap.decoded, 0, "no chunk without usage was decoded");
        assert_eq!(tap.usage, None);
        tap.sse(Bytes::from(USAGE));
        assert_eq!(tap.decoded, 1);
        assert_eq!(tap.usage.map(|u| u.prompt), Some(7));
    }

    #[test]
    fn a_crlf_stream_split_at_any_byte_loses_only_its_usage_chunk() {
        let lf = format!(
            "{}: keep-alive\n\n{}{USAGE}data: [DONE]\n\n",
            chunk("a"),
            chunk("b")
        );
        let crlf = lf.replace('\n', "\r\n");
        let expected = format!(
            "{}: keep-alive\r\n\r\n{}data: [DONE]\r\n\r\n",
            chunk("a"),
            chunk("b")
        )
        .replace("\n\n", "\r\n\r\n")
        .replace(",\"usage\":null", "");
        for at in 0..=crlf.len() {
            let mut tap = UsageTap::new(full(""), true, true, finish());
            let mut out = tap
                .sse(Bytes::copy_from_slice(&crlf.as_bytes()[..at]))
                .to_vec();
            out.extend_from_slice(&tap.sse(Bytes::copy_from_slice(&crlf.as_bytes()[at..])));
            assert_eq!(String::from_utf8(out).unwrap(), expected, "split at {at}");
            assert_eq!(tap.usage.map(|u| u.completion), Some(2), "split at {at}");
        }
    }

    #[test]
    fn the_fingerprint_of_a_removed_usage_chunk_goes_onto_the_finishing_chunk() {
        // As vLLM streams when asked for usage: the fingerprint only on the
        // usage chunk. A client that did not ask gets it where vLLM puts
        // it for such a client: on the chunk that finishes the choice.
        let content = r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        let last = r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason": "length"}]}"#;
        let usage = r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},"system_fingerprint":"vllm-0.32.0-abc"}"#;
        for line_end in ["\n", "\r\n"] {
            let end = line_end.repeat(2);
            let stream = format!("{content}{end}{last}{end}{usage}{end}data: [DONE]{end}");
            let stamped = last.replacen(
                "\"length\"}]}",
                "\"length\"}],\"system_fingerprint\":\"vllm-0.32.0-abc\"}",
                1,
            );
            let expected = format!("{content}{end}{stamped}{end}data: [DONE]{end}");
            for at in 0..=stream.len() {
                let mut tap = UsageTap::new(full(""), true, true, finish());
                let mut out = tap
                    .sse(Bytes::copy_from_slice(&stream.as_bytes()[..at]))
                    .to_vec();
                out.extend_from_slice(&tap.sse(Bytes::copy_from_slice(&stream.as_bytes()[at..])));
                assert_eq!(String::from_utf8(out).unwrap(), expected, "split at {at}");
                assert_eq!(tap.usage.map(|u| u.completion), Some(1));
            }
        }
        // A finishing chunk that already has one keeps it; a null is filled.
        assert_eq!(
            with_fingerprint(&Bytes::from_static(br#"{"system_fingerprint":"x"}"#), "y"),
            Bytes::from_static(br#"{"system_fingerprint":"x"}"#)
        );
        assert_eq!(
            with_fingerprint(&Bytes::from_static(br#"{"system_fingerprint":null}"#), "y"),
            Bytes::from_static(br#"{"system_fingerprint":"y"}"#)
        );
    }

    #[tokio::test]
    async fn a_held_finishing_chunk_is_sent_when_the_stream_ends_without_usage() {
        let last = "data: {\"choices\":[{\"index\":0,\"finish_reason\":\"stop\"}]}\n\n";
        let body = collect(UsageTap::new(full(last), true, true, finish())).await;
        assert_eq!(body, last);
    }

    impl UsageTap {
        fn end_for_test(&mut self) {
            if let Mode::Json { whole, .. } = &self.mode {
                self.usage = serde_json::from_slice(whole)
                    .ok()
                    .as_ref()
                    .and_then(usage_of);
            }
        }
    }
}
