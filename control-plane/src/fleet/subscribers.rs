//! What this replica knows of each routing-table stream attached to it:
//! who subscribed, from where, the version offered and the version
//! acknowledged, with when, and the last refusal. Sessions write it; the
//! fleet status and the replica digest read it. Times are Unix ms passed in
//! by the caller, so the bookkeeping is tested without a clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use infermesh_proto::v1::{SubscriberNack, SubscriberRole, SubscriberStatus};

/// Bytes of a NACK reason kept: enough for any message a subscriber
/// writes, small enough that a digest of many refusals stays bounded.
pub const MAX_REASON_BYTES: usize = 512;

/// A table a subscriber refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Version refused.
    pub version: u64,
    /// The subscriber's reason, cut to `MAX_REASON_BYTES`.
    pub reason: String,
    /// When it arrived, Unix ms.
    pub at_unix_ms: i64,
}

/// One stream's subscriber.
#[derive(Debug, Clone)]
pub struct SubscriberState {
    /// Edge or sidecar.
    pub role: SubscriberRole,
    /// Region served.
    pub region: String,
    /// Node id from its hello.
    pub node_id: String,
    /// Identity of its client certificate, if it presented one.
    pub identity: Option<String>,
    /// Where its stream comes from, when the transport knows.
    pub remote_address: Option<SocketAddr>,
    /// When the stream opened, Unix ms.
    pub connected_at_unix_ms: i64,
    /// Last version offered: sent on the stream, or held at connect time.
    pub offered: u64,
    /// Last version acknowledged.
    pub acked: u64,
    /// When `acked` was acknowledged (or the stream opened holding it), Unix ms.
    pub acked_at_unix_ms: i64,
    /// Last refusal on this stream.
    pub nacked: Option<Refusal>,
    /// Since when `acked` has been behind `offered`, Unix ms.
    pub behind_since_unix_ms: Option<i64>,
}

/// Who opened a stream, as its hello and transport tell.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// Edge or sidecar.
    pub role: SubscriberRole,
    /// Region served.
    pub region: String,
    /// Node id from its hello.
    pub node_id: String,
    /// Identity of its client certificate, if any.
    pub identity: Option<String>,
    /// Where its stream comes from.
    pub remote_address: Option<SocketAddr>,
}

impl SubscriberState {
    /// A stream that opened at `now` holding table `held` (0 for none):
    /// what it holds counts as offered and acknowledged.
    pub fn connected(subscriber: Subscriber, held: u64, now: i64) -> Self {
        Self {
            role: subscriber.role,
            region: subscriber.region,
            node_id: subscriber.node_id,
            identity: subscriber.identity,
            remote_address: subscriber.remote_address,
            connected_at_unix_ms: now,
            offered: held,
            acked: held,
            acked_at_unix_ms: now,
            nacked: None,
            behind_since_unix_ms: None,
        }
    }

    /// Table `version` was sent at `now`.
    pub fn offered(&mut self, version: u64, now: i64) {
        self.offered = self.offered.max(version);
        if self.acked < self.offered && self.behind_since_unix_ms.is_none() {
            self.behind_since_unix_ms = Some(now);
        }
    }

    /// Table `version` was acknowledged at `now`; the version acknowledged
    /// before, when this one is newer.
    pub fn acked(&mut self, version: u64, now: i64) -> Option<u64> {
        if version <= self.acked {
            return None;
        }
        let previous = self.acked;
        self.acked = version;
        self.acked_at_unix_ms = now;
        if self.acked >= self.offered {
            self.behind_since_unix_ms = None;
        }
        Some(previous)
    }

    /// Table `version` was refused at `now` for `reason`.
    pub fn nacked(&mut self, version: u64, reason: &str, now: i64) {
        self.nacked = Some(Refusal {
            version,
            reason: truncated(reason, MAX_REASON_BYTES).to_string(),
            at_unix_ms: now,
        });
    }

    /// Versions offered and not acknowledged (etcd revisions).
    pub fn lag_versions(&self) -> u64 {
        self.offered.saturating_sub(self.acked)
    }

    /// The wire form without the replica's name and without lag, as it
    /// goes into a digest; `with_lag` completes it for an answer.
    pub fn status(&self) -> SubscriberStatus {
        SubscriberStatus {
            role: self.role as i32,
            region: self.region.clone(),
            node_id: self.node_id.clone(),
            identity: self.identity.clone().unwrap_or_default(),
            remote_address: self
                .remote_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
            control_plane: String::new(),
            connected_at_unix_ms: self.connected_at_unix_ms,
            offered_version: self.offered,
            acked_version: self.acked,
            acked_at_unix_ms: self.acked_at_unix_ms,
            last_nack: self.nacked.as_ref().map(|n| SubscriberNack {
                version: n.version,
                reason: n.reason.clone(),
                at_unix_ms: n.at_unix_ms,
            }),
            lag_versions: 0,
            lag_seconds: 0.0,
            behind_since_unix_ms: self.behind_since_unix_ms.unwrap_or(0),
        }
    }
}

/// `status` with its lag as of `now`: the lag fields are derived, never
/// carried, so a digest read a round late still ages correctly.
pub fn with_lag(mut status: SubscriberStatus, now: i64) -> SubscriberStatus {
    status.lag_versions = status.offered_version.saturating_sub(status.acked_version);
    status.lag_seconds = if status.behind_since_unix_ms > 0 {
        now.saturating_sub(status.behind_since_unix_ms).max(0) as f64 / 1000.0
    } else {
        0.0
    };
    status
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Identifies one stream in a `SubscriberBook`: a subscriber that
/// reconnects gets a new one, so the old stream's end never removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(u64);

/// The subscribers of this replica's open streams.
#[derive(Debug, Default)]
pub struct SubscriberBook {
    streams: DashMap<StreamId, SubscriberState>,
    next: AtomicU64,
}

impl SubscriberBook {
    /// Records a newly opened stream.
    pub fn open(&self, state: SubscriberState) -> StreamId {
        let id = StreamId(self.next.fetch_add(1, Ordering::Relaxed));
        self.streams.insert(id, state);
        id
    }

    /// Changes the state of stream `id`, if it is open.
    pub fn update<T>(
        &self,
        id: StreamId,
        change: impl FnOnce(&mut SubscriberState) -> T,
    ) -> Option<T> {
        self.streams
            .get_mut(&id)
            .map(|mut state| change(&mut state))
    }

    /// Forgets a closed stream.
    pub fn close(&self, id: StreamId) {
        self.streams.remove(&id);
    }

    /// A copy of every open stream's state.
    pub fn states(&self) -> Vec<SubscriberState> {
        self.streams.iter().map(|e| e.value().clone()).collect()
    }

    /// Open streams.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// True when no stream is open.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(held: u64, now: i64) -> SubscriberState {
        SubscriberState::connected(
            Subscriber {
                role: SubscriberRole::Edge,
                region: "eu-west".into(),
                node_id: "edge-0".into(),
                identity: Some("edge/edge-0".into()),
                remote_address: Some("10.0.0.1:4000".parse().unwrap()),
            },
            held,
            now,
        )
    }

    #[test]
    fn a_subscriber_that_connects_holding_a_version_is_in_sync_with_it() {
        let state = edge(40, 1_000);
        let status = with_lag(state.status(), 5_000);
        assert_eq!((status.offered_version, status.acked_version), (40, 40));
        assert_eq!(status.acked_at_unix_ms, 1_000);
        assert_eq!((status.lag_versions, status.lag_seconds), (0, 0.0));
        assert_eq!(status.remote_address, "10.0.0.1:4000");
        assert_eq!(status.identity, "edge/edge-0");
    }

    #[test]
    fn lag_counts_from_the_first_offer_it_has_not_acknowledged() {
        let mut state = edge(0, 0);
        state.offered(10, 1_000);
        state.offered(12, 3_000);
        let behind = with_lag(state.status(), 4_500);
        assert_eq!(behind.lag_versions, 12);
        assert_eq!(behind.lag_seconds, 3.5, "behind since the offer of 10");
        assert_eq!(state.acked(10, 5_000), Some(0));
        assert_eq!(with_lag(state.status(), 5_000).lag_versions, 2);
        assert_eq!(state.behind_since_unix_ms, Some(1_000), "still behind");
        assert_eq!(state.acked(12, 6_000), Some(10));
        let caught_up = with_lag(state.status(), 9_000);
        assert_eq!((caught_up.lag_versions, caught_up.lag_seconds), (0, 0.0));
        assert_eq!(caught_up.acked_at_unix_ms, 6_000);
    }

    #[test]
    fn a_repeated_or_older_ack_changes_nothing() {
        let mut state = edge(0, 0);
        state.offered(10, 1_000);
        assert_eq!(state.acked(10, 2_000), Some(0));
        assert_eq!(state.acked(10, 3_000), None);
        assert_eq!(state.acked(7, 4_000), None);
        assert_eq!((state.acked, state.acked_at_unix_ms), (10, 2_000));
    }

    #[test]
    fn a_refusal_is_kept_with_its_version_and_a_bounded_reason() {
        let mut state = edge(5, 0);
        state.offered(9, 1_000);
        state.nacked(9, &"é".repeat(MAX_REASON_BYTES), 1_200);
        let status = with_lag(state.status(), 2_000);
        let nack = status.last_nack.expect("the refusal");
        assert_eq!((nack.version, nack.at_unix_ms), (9, 1_200));
        assert_eq!(
            nack.reason.len(),
            MAX_REASON_BYTES,
            "cut on a character boundary"
        );
        assert_eq!((status.lag_versions, status.lag_seconds), (4, 1.0));
        // A later table it takes ends the lag; the refusal stays on record.
        state.offered(11, 3_000);
        state.acked(11, 3_100);
        let status = with_lag(state.status(), 4_000);
        assert_eq!(status.lag_versions, 0);
        assert_eq!(status.last_nack.map(|n| n.version), Some(9));
    }

    #[test]
    fn a_reconnect_is_a_new_stream_the_old_one_cannot_remove() {
        let book = SubscriberBook::default();
        let old = book.open(edge(1, 0));
        let new = book.open(edge(1, 10));
        book.close(old);
        assert_eq!(book.len(), 1);
        assert_eq!(book.update(new, |s| s.connected_at_unix_ms), Some(10));
        assert_eq!(book.update(old, |s| s.connected_at_unix_ms), None);
    }
}
