//! Every replica's subscribers, as one list. Each replica publishes its
//! own streams' states in its load digest (bounded: see `DIGEST_BYTES`)
//! and merges the other replicas' digests, so the fleet status and
//! ListSubscribers answer the same whichever replica is asked. A replica
//! whose lease expired has no digest, so its subscribers leave with it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use infermesh_proto::v1::{LoadDigest, SubscriberRole, SubscriberStatus};
use prost::Message;

use super::subscribers::{SubscriberBook, with_lag};

/// Most bytes of subscriber entries one replica puts in its digest. The
/// digest is one etcd value (etcd refuses requests over 1.5 MiB by
/// default) rewritten every round, whose loads already take about 600 KB
/// at 10,000 endpoints (docs/benchmarks.md); an entry takes about 135
/// bytes, so about 950 fit.
pub const DIGEST_BYTES: usize = 128 * 1024;

/// Which subscribers an answer lists.
#[derive(Debug, Clone, Default)]
pub struct SubscriberFilter {
    /// Only this role, when set.
    pub role: Option<SubscriberRole>,
    /// Only this region, when set.
    pub region: Option<String>,
}

impl SubscriberFilter {
    fn admits(&self, status: &SubscriberStatus) -> bool {
        self.role.is_none_or(|role| status.role == role as i32)
            && self.region.as_ref().is_none_or(|r| &status.region == r)
    }
}

/// Subscribers of every replica, as answered to operators.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriberList {
    /// By region, role and node id, lag filled in.
    pub subscribers: Vec<SubscriberStatus>,
    /// Replicas whose subscribers are listed, by node id.
    pub control_planes: Vec<String>,
    /// Subscribers replicas left out of their digests.
    pub left_out: u32,
}

/// What the other replicas' digests hold.
#[derive(Debug, Default)]
struct PeerSubscribers {
    replicas: Vec<String>,
    subscribers: Vec<SubscriberStatus>,
    left_out: u32,
}

/// This replica's subscribers and the other replicas'.
#[derive(Debug)]
pub struct SubscriberView {
    node: String,
    local: Arc<SubscriberBook>,
    peers: RwLock<PeerSubscribers>,
}

impl SubscriberView {
    /// The view of replica `node`, whose own streams are in `local`.
    pub fn new(node: &str, local: Arc<SubscriberBook>) -> Self {
        Self {
            node: node.to_string(),
            local,
            peers: RwLock::default(),
        }
    }

    /// This replica's node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This replica's streams, written by the discovery service.
    pub fn local(&self) -> &Arc<SubscriberBook> {
        &self.local
    }

    /// This replica's entries for its digest, at most `DIGEST_BYTES`, and
    /// how many were left out.
    pub fn digest(&self) -> (Vec<SubscriberStatus>, u32) {
        bounded(
            self.local.states().iter().map(|s| s.status()).collect(),
            DIGEST_BYTES,
        )
    }

    /// Replaces what was read from the other replicas' digests.
    pub fn set_peers(&self, digests: &[LoadDigest]) {
        let mut peers = PeerSubscribers::default();
        for digest in digests {
            peers.replicas.push(digest.node.clone());
            peers.left_out = peers.left_out.saturating_add(digest.subscribers_left_out);
            peers
                .subscribers
                .extend(digest.subscribers.iter().map(|s| SubscriberStatus {
                    control_plane: digest.node.clone(),
                    ..s.clone()
                }));
        }
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// Every replica's subscribers that `filter` admits, with lag as of `now`.
    pub fn list(&self, filter: &SubscriberFilter, now: i64) -> SubscriberList {
        let local: Vec<SubscriberStatus> = self
            .local
            .states()
            .iter()
            .map(|s| SubscriberStatus {
                control_plane: self.node.clone(),
                ..s.status()
            })
            .collect();
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        let control_planes: BTreeSet<String> = std::iter::once(self.node.clone())
            .chain(peers.replicas.iter().cloned())
            .collect();
        let subscribers = merged(local, peers.subscribers.iter().cloned())
            .into_iter()
            .filter(|s| filter.admits(s))
            .map(|s| with_lag(s, now))
            .collect();
        SubscriberList {
            subscribers,
            control_planes: control_planes.into_iter().collect(),
            left_out: peers.left_out,
        }
    }
}

/// One entry per subscriber (role and node id), ordered by region, role
/// and node id. A subscriber listed by two replicas moved from one to the
/// other within a round: its newest stream is the one that counts; on a
/// tie this replica's own entry, which is current, wins.
fn merged(
    local: Vec<SubscriberStatus>,
    peers: impl IntoIterator<Item = SubscriberStatus>,
) -> Vec<SubscriberStatus> {
    let mut by_subscriber: HashMap<(i32, String), SubscriberStatus> = HashMap::new();
    for status in local.into_iter().chain(peers) {
        let key = (status.role, status.node_id.clone());
        match by_subscriber.get(&key) {
            Some(kept) if kept.connected_at_unix_ms >= status.connected_at_unix_ms => {}
            _ => {
                by_subscriber.insert(key, status);
            }
        }
    }
    let mut list: Vec<_> = by_subscriber.into_values().collect();
    list.sort_by(|a, b| (&a.region, a.role, &a.node_id).cmp(&(&b.region, b.role, &b.node_id)));
    list
}

/// `entries` cut to `budget` encoded bytes, and how many were cut.
/// Subscribers behind or refusing tables go first, since they are what an
/// operator looks for; then the rest by region, role and node id.
fn bounded(mut entries: Vec<SubscriberStatus>, budget: usize) -> (Vec<SubscriberStatus>, u32) {
    entries.sort_by(|a, b| {
        let in_sync =
            |s: &SubscriberStatus| s.acked_version >= s.offered_version && s.last_nack.is_none();
        (in_sync(a), &a.region, a.role, &a.node_id).cmp(&(
            in_sync(b),
            &b.region,
            b.role,
            &b.node_id,
        ))
    });
    let mut used = 0;
    let mut kept = 0;
    for entry in &entries {
        // The repeated field's tag and length prefix as well as the entry.
        let size = entry.encoded_len() + 4;
        if used + size > budget {
            break;
        }
        used += size;
        kept += 1;
    }
    let left_out = u32::try_from(entries.len() - kept).unwrap_or(u32::MAX);
    entries.truncate(kept);
    (entries, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::subscribers::{Subscriber, SubscriberState};

    fn subscriber(role: SubscriberRole, region: &str, node: &str) -> Subscriber {
        Subscriber {
            role,
            region: region.into(),
            node_id: node.into(),
            identity: None,
            remote_address: None,
        }
    }

    fn status(role: SubscriberRole, node: &str, connected: i64) -> SubscriberStatus {
        SubscriberState::connected(subscriber(role, "eu-west", node), 7, connected).status()
    }

    fn digest(node: &str, subscribers: Vec<SubscriberStatus>, left_out: u32) -> LoadDigest {
        LoadDigest {
            node: node.into(),
            subscribers,
            subscribers_left_out: left_out,
            ..Default::default()
        }
    }

    fn view_with_one_edge() -> SubscriberView {
        let book = Arc::new(SubscriberBook::default());
        let id = book.open(SubscriberState::connected(
            subscriber(SubscriberRole::Edge, "eu-west", "edge-a"),
            0,
            1_000,
        ));
        book.update(id, |s| s.offered(12, 2_000));
        SubscriberView::new("cp-a", book)
    }

    #[test]
    fn every_replica_lists_its_own_and_the_others_subscribers_with_their_replica() {
        let view = view_with_one_edge();
        view.set_peers(&[digest(
            "cp-b",
            vec![status(SubscriberRole::Sidecar, "llama-0", 500)],
            0,
        )]);
        let list = view.list(&SubscriberFilter::default(), 5_000);
        let seen: Vec<_> = list
            .subscribers
            .iter()
            .map(|s| (s.node_id.as_str(), s.control_plane.as_str()))
            .collect();
        assert_eq!(seen, [("edge-a", "cp-a"), ("llama-0", "cp-b")]);
        assert_eq!(list.control_planes, ["cp-a", "cp-b"]);
        let edge = &list.subscribers[0];
        assert_eq!(
            (edge.lag_versions, edge.lag_seconds),
            (12, 3.0),
            "lag is filled in on reading"
        );
    }

    #[test]
    fn a_replica_whose_digest_is_gone_takes_its_subscribers_with_it() {
        let view = view_with_one_edge();
        view.set_peers(&[digest(
            "cp-b",
            vec![status(SubscriberRole::Sidecar, "llama-0", 500)],
            3,
        )]);
        assert_eq!(view.list(&SubscriberFilter::default(), 0).left_out, 3);
        view.set_peers(&[]);
        let list = view.list(&SubscriberFilter::default(), 0);
        assert_eq!(list.subscribers.len(), 1);
        assert_eq!(list.control_planes, ["cp-a"]);
        assert_eq!(list.left_out, 0);
    }

    #[test]
    fn a_subscriber_that_moved_between_replicas_is_listed_once_where_it_is_now() {
        let view = view_with_one_edge();
        view.set_peers(&[
            digest("cp-b", vec![status(SubscriberRole::Edge, "edge-a", 400)], 0),
            digest("cp-c", vec![status(SubscriberRole::Sidecar, "s-0", 100)], 0),
            digest("cp-d", vec![status(SubscriberRole::Sidecar, "s-0", 900)], 0),
        ]);
        let list = view.list(&SubscriberFilter::default(), 0);
        let seen: Vec<_> = list
            .subscribers
            .iter()
            .map(|s| (s.node_id.as_str(), s.control_plane.as_str()))
            .collect();
        assert_eq!(seen, [("edge-a", "cp-a"), ("s-0", "cp-d")]);
    }

    #[test]
    fn filters_pick_a_role_and_a_region() {
        let view = view_with_one_edge();
        let mut elsewhere = status(SubscriberRole::Edge, "edge-us", 0);
        elsewhere.region = "us-east".into();
        view.set_peers(&[digest(
            "cp-b",
            vec![status(SubscriberRole::Sidecar, "llama-0", 0), elsewhere],
            0,
        )]);
        let names = |filter: SubscriberFilter| -> Vec<String> {
            view.list(&filter, 0)
                .subscribers
                .into_iter()
                .map(|s| s.node_id)
                .collect()
        };
        assert_eq!(
            names(SubscriberFilter {
                role: Some(SubscriberRole::Edge),
                region: None
            }),
            ["edge-a", "edge-us"]
        );
        assert_eq!(
            names(SubscriberFilter {
                role: Some(SubscriberRole::Sidecar),
                region: Some("eu-west".into())
            }),
            ["llama-0"]
        );
        assert!(
            names(SubscriberFilter {
                role: None,
                region: Some("ap-south".into())
            })
            .is_empty()
        );
    }

    #[test]
    fn a_digest_keeps_to_its_budget_and_keeps_those_behind_first() {
        let mut entries: Vec<_> = (0..100)
            .map(|i| status(SubscriberRole::Sidecar, &format!("s-{i:03}"), 0))
            .collect();
        entries[57].offered_version = 9;
        entries[80].last_nack = Some(infermesh_proto::v1::SubscriberNack {
            version: 8,
            reason: "bad".into(),
            at_unix_ms: 1,
        });
        let one = entries[0].encoded_len() + 4;
        let (kept, left_out) = bounded(entries.clone(), one * 10 + one / 2);
        assert_eq!((kept.len(), left_out), (10, 90));
        let first: Vec<_> = kept.iter().take(2).map(|s| s.node_id.as_str()).collect();
        assert_eq!(first, ["s-057", "s-080"], "behind or refusing go first");
        let size: usize = kept.iter().map(|e| e.encoded_len() + 4).sum();
        assert!(size <= one * 10 + one / 2);
        let (all, none) = bounded(entries, DIGEST_BYTES);
        assert_eq!((all.len(), none), (100, 0));
    }

    #[test]
    fn a_full_digest_of_long_names_fits_in_one_etcd_value() {
        let entries: Vec<_> = (0..10_000)
            .map(|i| {
                let mut s = status(SubscriberRole::Sidecar, &format!("{i:0>253}"), 0);
                s.identity = "x".repeat(300);
                s.last_nack = Some(infermesh_proto::v1::SubscriberNack {
                    version: 1,
                    reason: "r".repeat(crate::fleet::subscribers::MAX_REASON_BYTES),
                    at_unix_ms: 1,
                });
                s
            })
            .collect();
        let (kept, left_out) = bounded(entries, DIGEST_BYTES);
        let digest = digest("cp-a", kept, left_out);
        assert!(
            digest.encoded_len() <= DIGEST_BYTES + 64,
            "{}",
            digest.encoded_len()
        );
        assert!(left_out > 9_000);
    }
}
