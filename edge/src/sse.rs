//! Server-sent events as they arrive in a response body, for the readers
//! that watch a stream on its way to the client: usage accounting and cache
//! capture. The framer cuts the bytes into events at their blank line (LF,
//! CRLF or lone CR line ends, as the SSE spec allows, wherever the body's
//! chunks happen to split them) and joins each event's `data` lines. It
//! never alters bytes: every part it hands on carries its raw bytes, and the
//! parts, concatenated, are the stream. It holds at most one incomplete
//! event, up to a cap; what the stream sends beyond that is handed on
//! unread rather than buffered.

use std::ops::Range;
use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem::Finder;

/// The default cap on an incomplete event. An engine's chunk is a few
/// hundred bytes; the cap only bounds what a stream that is not a chunk
/// stream can make the edge hold.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    raw: Bytes,
    data: Option<Bytes>,
}

impl Event {
    /// The event's bytes as they arrived, its blank line included.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The event's `data` lines joined with `\n`; `None` when it has none
    /// (a comment or a keep-alive), which the SSE spec does not dispatch.
    pub fn data(&self) -> Option<&Bytes> {
        self.data.as_ref()
    }

    /// Whether this is the `data: [DONE]` that ends an OpenAI stream.
    pub fn is_done(&self) -> bool {
        self.data
            .as_deref()
            .is_some_and(|d| d.trim_ascii() == b"[DONE]")
    }

    /// Whether the event's data holds a `"usage"` key with a value other
    /// than `null`: only such a chunk is worth decoding for token counts.
    /// Found by a byte search, so that the many chunks that carry
    /// `"usage":null` or no usage at all are never parsed.
    pub fn carries_usage(&self) -> bool {
        self.data.as_deref().is_some_and(carries_usage)
    }
}

/// What the framer hands on, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A complete event.
    Event(Event),
    /// The LF of a CRLF whose CR ended the event handed on before it: the
    /// two arrived in different chunks, and the event was not held back
    /// for a byte that might not come.
    LineEndTail(Bytes),
    /// Bytes of an event that grew past the cap, handed on unread as they
    /// arrive until its blank line; framing goes on after it.
    Oversize(Bytes),
    /// An event the stream ended inside; the SSE spec does not dispatch it.
    Unfinished(Bytes),
}

impl Part {
    /// The part's bytes as they arrived.
    pub fn raw(&self) -> &Bytes {
        match self {
            Part::Event(event) => &event.raw,
            Part::LineEndTail(raw) | Part::Oversize(raw) | Part::Unfinished(raw) => raw,
        }
    }
}

/// The `data` of the event being read: most events have one line, kept as
/// a range of the buffer so that it is handed on without a copy.
#[derive(Debug, Default)]
enum Data {
    #[default]
    None,
    One(Range<usize>),
    Joined(Vec<u8>),
}

/// See the module docs.
#[derive(Debug)]
pub struct Framer {
    /// Bytes not yet handed on: the start of the current event.
    buf: BytesMut,
    /// How far `buf` has been read.
    pos: usize,
    /// Where the current line starts in `buf`.
    line_start: usize,
    /// The current line began in bytes already handed on (an oversize
    /// event), so it is not empty even when nothing of it is left in `buf`.
    line_begun: bool,
    /// The last byte read was a CR ending a line: an LF right after it
    /// belongs to the same line end.
    after_cr: bool,
    /// That CR ended an event already handed on, so its LF is handed on as
    /// a part of its own.
    tail_due: bool,
    /// The current event is over the cap: its bytes are handed on unread.
    oversize: bool,
    data: Data,
    max_event: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new(MAX_EVENT_BYTES)
    }
}

impl Framer {
    /// A framer that holds at most `max_event` bytes of an incomplete event.
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            pos: 0,
            line_start: 0,
            line_begun: false,
            after_cr: false,
            tail_due: false,
            oversize: false,
            data: Data::None,
            max_event,
        }
    }

    /// Adds the next bytes of the stream; take the parts they complete with
    /// [`Framer::next_part`] until it returns `None`.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next part the bytes pushed so far complete.
    pub fn next_part(&mut self) -> Option<Part> {
        loop {
            if self.after_cr && self.pos < self.buf.len() {
                self.after_cr = false;
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                    self.line_start = self.pos;
                    if std::mem::take(&mut self.tail_due) {
                        return Some(Part::LineEndTail(self.take(self.pos)));
                    }
                    continue;
                }
                self.tail_due = false;
            }
            let Some(found) = memchr::memchr2(b'\n', b'\r', &self.buf[self.pos..]) else {
                self.pos = self.buf.len();
                return self.incomplete();
            };
            let end = self.pos + found;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                match self.buf.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let blank = end == self.line_start && !self.line_begun;
            if !blank && !self.oversize {
                self.field(self.line_start..end);
            }
            self.line_begun = false;
            self.pos = next;
            self.line_start = next;
            if blank {
                self.tail_due = self.after_cr;
                let data = std::mem::take(&mut self.data);
                let raw = self.take(next);
                if std::mem::take(&mut self.oversize) {
                    return Some(Part::Oversize(raw));
                }
                if raw.len() > self.max_event {
                    // Arrived whole in one chunk: still not read, so that
                    // what is read does not depend on how the body is split.
                    self.over_cap();
                    return Some(Part::Oversize(raw));
                }
                let data = match data {
                    Data::None => None,
                    Data::One(range) => Some(raw.slice(range)),
                    Data::Joined(joined) => Some(Bytes::from(joined)),
                };
                return Some(Part::Event(Event { raw, data }));
            }
        }
    }

    /// What is left when the stream ends: the event it ended inside, if any.
    /// Take every part with [`Framer::next_part`] first; the framer starts
    /// afresh after it.
    pub fn finish(&mut self) -> Option<Part> {
        let done = std::mem::replace(self, Self::new(self.max_event));
        if done.buf.is_empty() {
            return None;
        }
        let rest = done.buf.freeze();
        Some(if done.oversize {
            Part::Oversize(rest)
        } else {
            Part::Unfinished(rest)
        })
    }

    /// All pushed bytes are read and no event is complete: hands on what
    /// must not be held (an oversize event's bytes).
    fn incomplete(&mut self) -> Option<Part> {
        if !self.oversize && self.buf.len() > self.max_event {
            self.over_cap();
            self.oversize = true;
            self.data = Data::None;
        }
        if !self.oversize || self.buf.is_empty() {
            return None;
        }
        self.line_begun |= self.pos > self.line_start;
        let raw = self.take(self.buf.len());
        Some(Part::Oversize(raw))
    }

    fn over_cap(&self) {
        tracing::debug!(
            limit = self.max_event,
            "an event stream sent an event over the cap; it passes unread"
        );
    }

    /// Hands on the first `len` bytes of the buffer; offsets restart after them.
    fn take(&mut self, len: usize) -> Bytes {
        self.pos -= len;
        self.line_start = self.line_start.saturating_sub(len);
        self.buf.split_to(len).freeze()
    }

    /// Reads one non-empty line of the current event.
    fn field(&mut self, line: Range<usize>) {
        let bytes = &self.buf[line.clone()];
        if bytes.first() == Some(&b':') {
            return;
        }
        let (name, value) = match memchr::memchr(b':', bytes) {
            Some(colon) => {
                let skip = usize::from(bytes.get(colon + 1) == Some(&b' '));
                (&bytes[..colon], line.start + colon + 1 + skip..line.end)
            }
            None => (bytes, line.end..line.end),
        };
        if name != b"data" {
            return;
        }
        self.data = match std::mem::take(&mut self.data) {
            Data::None => Data::One(value),
            Data::One(first) => {
                let mut joined = self.buf[first].to_vec();
                joined.push(b'\n');
                joined.extend_from_slice(&self.buf[value]);
                Data::Joined(joined)
            }
            Data::Joined(mut joined) => {
                joined.push(b'\n');
                joined.extend_from_slice(&self.buf[value]);
                Data::Joined(joined)
            }
        };
    }
}

/// Writes one event carrying `data`, a line per line of `data`.
pub fn write_event(out: &mut BytesMut, data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));

/// Whether a chunk's JSON text holds a `"usage"` key whose value is not
/// `null`. A `"usage"` not followed by a colon is a string value, not a key.
fn carries_usage(data: &[u8]) -> bool {
    USAGE_KEY.find_iter(data).any(|at| {
        let after = data[at + b"\"usage\"".len()..].trim_ascii_start();
        after
            .strip_prefix(b":")
            .is_some_and(|value| !value.trim_ascii_start().starts_with(b"null"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part of `chunks` pushed one after the other, then the rest.
    fn frame(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<Part> {
        let mut parts = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            while let Some(part) = framer.next_part() {
                parts.push(part);
            }
        }
        parts.extend(framer.finish());
        parts
    }

    fn data_of(parts: &[Part]) -> Vec<String> {
        parts
            .iter()
            .filter_map(|p| match p {
                Part::Event(e) => e.data().map(|d| String::from_utf8_lossy(d).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn raw_of(parts: &[Part]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.raw().to_vec()).collect()
    }

    const MIXED: &[u8] = b": keep-alive\n\n\
        data: {\"a\":1}\n\n\
        data:{\"b\":2}\r\n\r\n\
        event: message\r\nid: 7\r\ndata: line one\r\ndata: line two\r\n\r\n\
        data: lone\rdata: cr\r\r\
        data\n: a comment inside\ndata:  two spaces\n\n\
        data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7}}\r\n\r\n\
        data: [DONE]\r\n\r\n";

    fn expected() -> Vec<String> {
        vec![
            r#"{"a":1}"#.into(),
            r#"{"b":2}"#.into(),
            "line one\nline two".into(),
            "lone\ncr".into(),
            "\n two spaces".into(),
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":7}}"#.into(),
            "[DONE]".into(),
        ]
    }

    #[test]
    fn lf_crlf_and_lone_cr_events_are_read_with_their_data_joined() {
        let parts = frame(&mut Framer::default(), &[MIXED]);
        assert_eq!(data_of(&parts), expected());
        assert_eq!(raw_of(&parts), MIXED, "the parts are the stream");
        assert!(
            parts.iter().all(|p| matches!(p, Part::Event(_))),
            "{parts:?}"
        );
        let Part::Event(keep_alive) = &parts[0] else {
            panic!()
        };
        assert_eq!(keep_alive.data(), None, "a comment carries no data");
        let Part::Event(done) = parts.last().unwrap() else {
            panic!()
        };
        assert!(done.is_done());
    }

    #[test]
    fn an_event_split_at_any_byte_is_read_as_if_whole() {
        for at in 0..=MIXED.len() {
            let parts = frame(&mut Framer::default(), &[&MIXED[..at], &MIXED[at..]]);
            assert_eq!(data_of(&parts), expected(), "split at {at}");
            assert_eq!(raw_of(&parts), MIXED, "split at {at}");
        }
        let bytes: Vec<&[u8]> = MIXED.chunks(1).collect();
        let parts = frame(&mut Framer::default(), &bytes);
        assert_eq!(data_of(&parts), expected(), "byte by byte");
        assert_eq!(raw_of(&parts), MIXED);
    }

    #[test]
    fn an_lf_arriving_after_the_cr_that_ended_an_event_is_its_tail() {
        let parts = frame(
            &mut Framer::default(),
            &[b"data: a\r\n\r", b"\ndata: b\r\n\r\n"],
        );
        assert_eq!(data_of(&parts), ["a", "b"]);
        assert_eq!(
            parts[1],
            Part::LineEndTail(Bytes::from_static(b"\n")),
            "{parts:?}"
        );
        let parts = frame(&mut Framer::default(), &[b"data: a\r\r", b"data: b\r\r"]);
        assert_eq!(data_of(&parts), ["a", "b"], "a lone CR ends the line");
        assert!(parts.iter().all(|p| matches!(p, Part::Event(_))));
    }

    #[test]
    fn an_event_over_the_cap_passes_unread_and_framing_goes_on_after_it() {
        let big = format!("data: {}\n", "x".repeat(100));
        let stream = format!("data: first\n\n{big}{big}\ndata: after\n\n");
        for at in 0..=stream.len() {
            let (head, tail) = stream.as_bytes().split_at(at);
            let parts = frame(&mut Framer::new(64), &[head, tail]);
            assert_eq!(raw_of(&parts), stream.as_bytes(), "split at {at}");
            let events = data_of(&parts);
            assert_eq!(events.last().map(String::as_str), Some("after"), "{at}");
            assert!(!events.iter().any(|d| d.contains('x')), "{at}: {events:?}");
        }
        let bytes: Vec<&[u8]> = stream.as_bytes().chunks(8).collect();
        let parts = frame(&mut Framer::new(64), &bytes);
        assert!(
            parts
                .iter()
                .filter(|p| matches!(p, Part::Oversize(_)))
                .all(|p| p.raw().len() <= 64 + 8),
            "nothing over the cap is held: {parts:?}"
        );
        assert_eq!(data_of(&parts), ["first", "after"]);
    }

    #[test]
    fn a_stream_ending_inside_an_event_hands_it_on_unfinished() {
        let parts = frame(&mut Framer::default(), &[b"data: a\n\ndata: [DONE]\n"]);
        assert_eq!(data_of(&parts), ["a"]);
        assert_eq!(
            parts.last(),
            Some(&Part::Unfinished(Bytes::from_static(b"data: [DONE]\n")))
        );
    }

    #[test]
    fn usage_is_found_only_where_it_is_not_null() {
        let event = |data: &str| Event {
            raw: Bytes::new(),
            data: Some(Bytes::from(data.to_string())),
        };
        assert!(event(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#).carries_usage());
        assert!(event(r#"{"choices":[], "usage" : {"prompt_tokens":1}}"#).carries_usage());
        assert!(!event(r#"{"choices":[{"delta":{}}],"usage":null}"#).carries_usage());
        assert!(!event(r#"{"choices":[{"delta":{}}], "usage": null}"#).carries_usage());
        assert!(!event(r#"{"choices":[{"delta":{"content":"usage"}}]}"#).carries_usage());
        assert!(!event(r#"{"choices":[]}"#).carries_usage());
        assert!(!event("[DONE]").carries_usage());
    }

    #[test]
    fn written_events_read_back() {
        let mut out = BytesMut::new();
        write_event(&mut out, b"{\"a\":1}");
        write_event(&mut out, b"two\nlines");
        assert_eq!(&out[..], b"data: {\"a\":1}\n\ndata: two\ndata: lines\n\n");
        let parts = frame(&mut Framer::default(), &[&out]);
        assert_eq!(data_of(&parts), ["{\"a\":1}", "two\nlines"]);
    }
}
