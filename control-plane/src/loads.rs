//! Every replica's view of every replica's load and subscribers. A sidecar
//! streams its load to one control-plane replica, and every subscriber its
//! routing tables; each replica writes what it holds to `loads/<node>`
//! under its own lease at a coarse interval and reads the others', so that
//! admin reads and the leader's autoscaler see the whole fleet whichever
//! replica the sidecars and edges chose. A replica that dies takes its
//! digest with it when its lease expires.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use infermesh_proto::v1::{Load, LoadDigest};
use prost::Message;
use tokio_util::sync::CancellationToken;

use etcd_client::KeyValue;

use crate::fleet::SubscriberView;
use crate::metrics::ControlPlaneMetrics;
use crate::store::{ObjectKind, Store, StoreError, decode};

/// Latest load per endpoint id, as reported on this replica's streams.
pub type LoadBook = dashmap::DashMap<String, Load>;

/// Loads reported here and loads other replicas reported.
#[derive(Default)]
pub struct LoadView {
    local: Arc<LoadBook>,
    peers: RwLock<HashMap<String, Load>>,
}

impl LoadView {
    /// The loads of sidecars streaming to this replica, written by the
    /// load-report service.
    pub fn local(&self) -> &Arc<LoadBook> {
        &self.local
    }

    /// The latest load of an endpoint, wherever it reports.
    pub fn get(&self, endpoint: &str) -> Option<Load> {
        let local = self.local.get(endpoint).map(|l| l.clone());
        let peer = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(endpoint)
            .cloned();
        match (local, peer) {
            (Some(a), Some(b)) => Some(if b.observed_at_unix_ms > a.observed_at_unix_ms {
                b
            } else {
                a
            }),
            (a, b) => a.or(b),
        }
    }

    /// Replaces the loads read from other replicas.
    fn set_peers(&self, peers: HashMap<String, Load>) {
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    fn digest(&self, node: &str) -> LoadDigest {
        LoadDigest {
            node: node.to_string(),
            loads: self
                .local
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect(),
            ..Default::default()
        }
    }
}

/// One replica's record under `<dir><node>`, kept under the replica's own
/// lease, and a read of every other replica's record in the same directory.
pub struct Peers {
    store: Store,
    key: String,
    dir: String,
    ttl: i64,
    lease: Option<i64>,
}

impl Peers {
    /// Records of `kind`, this replica's named `node`; each outlives three
    /// missed rounds of `interval`, then leaves with the lease.
    pub fn new(store: Store, kind: ObjectKind, node: &str, interval: Duration) -> Self {
        Self {
            key: store.keys().object(kind, node),
            dir: store.keys().dir(kind),
            ttl: (interval.as_secs() as i64 * 3).max(5),
            lease: None,
            store,
        }
    }

    /// Writes this replica's record; the other replicas' records.
    pub async fn exchange(&mut self, record: Vec<u8>) -> Result<Vec<KeyValue>, StoreError> {
        let id = match self.lease {
            Some(id) if self.store.renew_lease(id).await.is_ok() => id,
            _ => {
                let id = self.store.grant_lease(self.ttl).await?;
                self.lease = Some(id);
                id
            }
        };
        self.store.put_aux(&self.key, record, Some(id)).await?;
        let (kvs, _) = self.store.get_prefix(&self.dir).await?;
        Ok(kvs
            .into_iter()
            .filter(|kv| kv.key_str().ok() != Some(self.key.as_str()))
            .collect())
    }

    /// Removes this replica's record now.
    pub async fn leave(&mut self) {
        if let Some(lease) = self.lease.take() {
            let _ = self.store.revoke_lease(lease).await;
        }
    }
}

/// What one replica shares with the others.
pub struct Shared {
    /// Its sidecars' loads.
    pub loads: Arc<LoadView>,
    /// Its routing-table subscribers.
    pub subscribers: Arc<SubscriberView>,
}

/// Writes this replica's digest and reads the others' every `interval`
/// until cancelled; etcd failures are logged and retried next round. Each
/// round also refreshes the subscriber lag gauge.
pub async fn exchange(
    store: Store,
    node: String,
    shared: Shared,
    metrics: Arc<ControlPlaneMetrics>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let Shared {
        loads: view,
        subscribers,
    } = shared;
    let mut peers = Peers::new(store, ObjectKind::LoadDigest, &node, interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let local = subscribers.local().states();
        metrics.subscriber_lags(
            local
                .iter()
                .map(|s| (s.role, s.region.as_str(), s.lag_versions())),
        );
        let mut digest = view.digest(&node);
        (digest.subscribers, digest.subscribers_left_out) = subscribers.digest();
        match peers.exchange(digest.encode_to_vec()).await {
            Ok(kvs) => {
                let digests = decoded(&kvs);
                view.set_peers(merge(&digests));
                subscribers.set_peers(&digests);
            }
            Err(error) => {
                tracing::warn!(%error, "load exchange round failed; trying again next round")
            }
        }
    }
    peers.leave().await;
}

/// The other replicas' digests that decode.
fn decoded(kvs: &[KeyValue]) -> Vec<LoadDigest> {
    kvs.iter()
        .filter_map(|kv| {
            decode::<LoadDigest>(kv)
                .inspect_err(|error| tracing::warn!(%error, "skipping an undecodable load digest"))
                .ok()
        })
        .collect()
}

/// The newest load of every endpoint in other replicas' digests.
fn merge(digests: &[LoadDigest]) -> HashMap<String, Load> {
    let mut peers = HashMap::new();
    for digest in digests {
        for (endpoint, load) in &digest.loads {
            let newer = peers
                .get(endpoint)
                .is_none_or(|l: &Load| load.observed_at_unix_ms > l.observed_at_unix_ms);
            if newer {
                peers.insert(endpoint.clone(), load.clone());
            }
        }
    }
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(at: i64, waiting: u32) -> Load {
        Load {
            observed_at_unix_ms: at,
            waiting,
            ..Default::default()
        }
    }

    #[test]
    fn the_newest_report_wins_wherever_it_came_from() {
        let view = LoadView::default();
        view.local().insert("a".into(), load(100, 1));
        view.local().insert("b".into(), load(100, 2));
        view.set_peers(HashMap::from([
            ("b".to_string(), load(200, 7)),
            ("c".to_string(), load(50, 3)),
        ]));
        assert_eq!(view.get("a").unwrap().waiting, 1);
        assert_eq!(
            view.get("b").unwrap().waiting,
            7,
            "the peer's report is newer"
        );
        assert_eq!(view.get("c").unwrap().waiting, 3);
        assert!(view.get("d").is_none());
        let digest = view.digest("cp-0");
        assert_eq!(digest.node, "cp-0");
        assert_eq!(digest.loads.len(), 2, "only what this replica holds");
    }
}
