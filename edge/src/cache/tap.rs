//! Records an engine's answer for the cache as it streams to the client,
//! without holding it back: the raw bytes are copied aside (up to the entry
//! limit) and, when the body ends complete, turned into the stored form and
//! written. A body that fails, is cut short, or grows past the limit is not
//! stored; whoever waits on the same key is told to go to the engine.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use infermesh_runtime::http::{Body, BoxError};

use super::{Flight, ResponseCache, replay};
use crate::openai::Endpoint;

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

/// See the module docs.
pub struct CacheTap {
    inner: Body,
    recording: Option<Recording>,
    copy: BytesMut,
}

impl CacheTap {
    /// Copies `inner` aside for `recording`.
    pub fn new(inner: Body, recording: Recording) -> Self {
        Self {
            inner,
            recording: Some(recording),
            copy: BytesMut::new(),
        }
    }

    fn finish(&mut self, complete: bool) {
        let Some(recording) = self.recording.take() else {
            return;
        };
        let answer = if complete {
            let body = std::mem::take(&mut self.copy).freeze();
            if recording.sse {
                replay::assemble(&body, recording.endpoint)
                    .and_then(|value| serde_json::to_vec(&value).ok())
                    .map(Bytes::from)
            } else {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .filter(|v| v.get("choices").is_some() || v.get("data").is_some())
                    .map(|_| body)
            }
        } else {
            None
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
                if let Some(flight) = flight {
                    flight.resolve(Some(answer.clone()));
                }
                tokio::spawn(async move { cache.store(key, answer, ttl).await });
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
                    if this.copy.len() + data.len() > recording.max_bytes {
                        tracing::debug!(limit = recording.max_bytes, "answer too large to cache");
                        this.finish(false);
                    } else {
                        this.copy.extend_from_slice(data);
                        // A body of known length may not be polled past its last byte.
                        if this.inner.is_end_stream() {
                            this.finish(true);
                        }
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

    #[tokio::test]
    async fn a_complete_json_answer_is_stored_and_handed_to_waiters() {
        let cache = ResponseCache::new(
            Arc::new(crate::cache::store::MemoryStore::new(1 << 20)),
            CacheConfig {
                default_ttl: Duration::from_secs(60),
                max_entry_bytes: 1 << 20,
                flight_wait: Duration::from_secs(5),
            },
            &prometheus::Registry::new(),
        )
        .unwrap();
        let Joined::Leader(flight) = cache.join("k") else {
            panic!()
        };
        let Joined::Follower(rx) = cache.join("k") else {
            panic!()
        };
        let answer =
            r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}"#;
        let tap = CacheTap::new(
            full(answer),
            Recording {
                cache: cache.clone(),
                key: "k".into(),
                ttl: Duration::from_secs(60),
                max_bytes: 1 << 20,
                endpoint: Endpoint::ChatCompletions,
                sse: false,
                flight: Some(flight),
            },
        );
        let body = tap.collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], answer.as_bytes());
        assert_eq!(cache.follow(rx).await.as_deref(), Some(answer.as_bytes()));
        let lookup = Lookup {
            keys: vec![(String::new(), "k".into())],
            lookup: true,
            store: true,
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        let stored = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(found) = cache.get(&lookup).await {
                    return found;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("stored");
        assert_eq!(&stored[..], answer.as_bytes());
    }
}
