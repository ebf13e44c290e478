//! Records an engine's answer for the cache as it streams to the client,
//! without holding it back: a JSON body is copied aside, an SSE stream is
//! read event by event into the answer it amounts to (so neither line
//! endings nor chunk boundaries matter), up to the entry limit counted in
//! bytes received; when the body ends complete, the stored form is written.
//! A body that fails, is cut short, or grows past the limit is not stored;
//! whoever waits on the same key is told to go to the engine.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use infermesh_runtime::http::{Body, BoxError};

use super::replay::Assembler;
use super::{Flight, ResponseCache};
use crate::openai::Endpoint;
use crate::sse::Framer;

/// What to store, where, and for how long.
pub struct Recording {
    /// The cache to write to.
    pub cache: Arc<ResponseCache>,
    /// The key to store under.
    pub key: String,
    /// Entry lifetime.
    pub ttl: Duration,
    /// Largest body stored.
    pub max_bytes: usize,
    /// What kind of answer it is.
    pub endpoint: Endpoint,
    /// Whether the body is an SSE stream.
    pub sse: bool,
    /// Waiters on this key, told how it went when the body ends.
    pub flight: Option<Flight>,
}

/// What has been taken from the body so far.
enum Capture {
    /// A JSON answer's bytes.
    Json(BytesMut),
    /// A stream's events, read into the answer as they complete.
    Sse {
        framer: Framer,
        answer: Box<Assembler>,
        received: usize,
    },
    /// Nothing more to take: the recording is over.
    Done,
}

/// See the module docs.
pub struct CacheTap {
    inner: Body,
    recording: Option<Recording>,
    capture: Capture,
}

impl CacheTap {
    /// Records `inner` for `recording`.
    pub fn new(inner: Body, recording: Recording) -> Self {
        let capture = if recording.sse {
            Capture::Sse {
                framer: Framer::default(),
                answer: Box::new(Assembler::new(recording.endpoint)),
                received: 0,
            }
        } else {
            Capture::Json(BytesMut::new())
        };
        Self {
            inner,
            recording: Some(recording),
            capture,
        }
    }

    /// Takes in the next bytes; `false` once the body is over the limit.
    fn take_in(&mut self, data: &Bytes, max_bytes: usize) -> bool {
        match &mut self.capture {
            Capture::Json(copy) => {
                if copy.len() + data.len() > max_bytes {
                    return false;
                }
                copy.extend_from_slice(data);
            }
            Capture::Sse {
                framer,
                answer,
                received,
            } => {
                *received += data.len();
                if *received > max_bytes {
                    return false;
                }
                framer.push(data);
                while let Some(part) = framer.next_part() {
                    answer.add(&part);
                }
            }
            Capture::Done => {}
        }
        true
    }

    fn finish(&mut self, complete: bool) {
        let Some(recording) = self.recording.take() else {
            return;
        };
        let capture = std::mem::replace(&mut self.capture, Capture::Done);
        let answer = match capture {
            _ if !complete => None,
            Capture::Json(copy) => {
                let body = copy.freeze();
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .filter(|v| v.get("choices").is_some() || v.get("data").is_some())
                    .map(|_| body)
            }
            Capture::Sse {
                mut framer,
                mut answer,
                ..
            } => {
                if let Some(rest) = framer.finish() {
                    answer.add(&rest);
                }
                answer
                    .finish()
                    .and_then(|value| serde_json::to_vec(&value).ok())
                    .map(Bytes::from)
            }
            Capture::Done => None,
        };
        let Recording {
            cache,
            key,
            ttl,
            flight,
            ..
        } = recording;
        match answer {
            Some(answer) => {
                // Stored before the flight ends: a request arriving between
                // the two joins the flight instead of missing the store.
                tokio::spawn(async move {
                    cache.store(key, answer.clone(), ttl).await;
                    if let Some(flight) = flight {
                        flight.resolve(Some(answer));
                    }
                });
            }
            None => {
                if let Some(flight) = flight {
                    flight.resolve(None);
                }
            }
        }
    }
}

impl HttpBody for CacheTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(recording)) = (frame.data_ref(), &this.recording) {
                    let limit = recording.max_bytes;
                    if !this.take_in(data, limit) {
                        tracing::debug!(limit, "answer too large to cache");
                        this.finish(false);
                    } else if this.inner.is_end_stream() {
                        // A body of known length may not be polled past its last byte.
                        this.finish(true);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CacheTap {
    fn drop(&mut self) {
        // A client that went away: the answer may be incomplete.
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, Joined, Lookup};
    use http_body_util::BodyExt;
    use infermesh_runtime::http::full;

    fn cache() -> Arc<ResponseCache> {
        ResponseCache::new(
            Arc::new(crate::cache::store::MemoryStore::new(1 << 20)),
            CacheConfig {
                default_ttl: Duration::from_secs(60),
                max_entry_bytes: 1 << 20,
                flight_wait: Duration::from_secs(5),
            },
            &prometheus::Registry::new(),
        )
        .unwrap()
    }

    fn recording(cache: &Arc<ResponseCache>, sse: bool, flight: Option<Flight>) -> Recording {
        Recording {
            cache: cache.clone(),
            key: "k".into(),
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
            endpoint: Endpoint::ChatCompletions,
            sse,
            flight,
        }
    }

    async fn stored(cache: &ResponseCache) -> Bytes {
        let lookup = Lookup {
            keys: vec![(String::new(), "k".into())],
            lookup: true,
            store: true,
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(found) = cache.get(&lookup).await {
                    return found;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("stored")
    }

    #[tokio::test]
    async fn a_complete_json_answer_is_stored_and_handed_to_waiters() {
        let cache = cache();
        let Joined::Leader(flight) = cache.join("k") else {
            panic!()
        };
        let Joined::Follower(rx) = cache.join("k") else {
            panic!()
        };
        let answer =
            r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}"#;
        let tap = CacheTap::new(full(answer), recording(&cache, false, Some(flight)));
        let body = tap.collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], answer.as_bytes());
        assert_eq!(cache.follow(rx).await.as_deref(), Some(answer.as_bytes()));
        assert_eq!(&stored(&cache).await[..], answer.as_bytes());
    }

    #[tokio::test]
    async fn a_crlf_stream_split_across_frames_is_stored_as_its_answer() {
        let stream = "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\r\n\r\n\
            data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n\
            data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\r\n\r\n\
            data: [DONE]\r\n\r\n";
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = stream
            .as_bytes()
            .chunks(7)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let cache = cache();
        let tap = CacheTap::new(inner.boxed(), recording(&cache, true, None));
        let body = tap.collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            stream.as_bytes(),
            "the client gets the stream as sent"
        );
        let answer: serde_json::Value = serde_json::from_slice(&stored(&cache).await).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "Hi");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        assert_eq!(answer["usage"]["total_tokens"], 2);
    }
}
