//! The watched snapshot: every registry object and endpoint under the
//! prefix, kept current by one etcd watch and published whole through a
//! `watch` channel. Readers take an `Arc` and never block the watcher. The
//! maps are persistent (`imbl::OrdMap`): publishing a snapshot after each
//! event shares every unchanged node with the previous one instead of
//! copying thousands of endpoints.
//! Revision 0 means "not synced yet": nothing may be pushed from it.
//! A watch that falls behind etcd and stays behind is re-established from
//! a fresh read (`watch_stall`).

use std::sync::Arc;

use etcd_client::{EventType, KeyValue, WatchOptions};
use futures_util::StreamExt;
use imbl::OrdMap;
use infermesh_proto::v1::{
    Adapter, ApiKey, Endpoint, EndpointState, Model, Pool, Region, Revocation, Tenant,
};
use infermesh_runtime::backoff::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::ControlPlaneMetrics;
use crate::store::objects::{Object, stored};
use crate::store::{Keys, ObjectKind, Store, StoreError, decode};
use crate::watch_stall::{StallDetector, Verdict};

/// How often etcd's newest revision under the prefix is read.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the watch may stay behind a revision etcd reported.
pub const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything under the prefix at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// etcd revision this snapshot reflects; 0 until the first sync.
    pub revision: i64,
    /// Models by name.
    pub models: OrdMap<String, Model>,
    /// Pools by name.
    pub pools: OrdMap<String, Pool>,
    /// Regions by name.
    pub regions: OrdMap<String, Region>,
    /// Registered endpoints by id.
    pub endpoints: OrdMap<String, Endpoint>,
    /// Tenants by name.
    pub tenants: OrdMap<String, Tenant>,
    /// LoRA adapters by name.
    pub adapters: OrdMap<String, Adapter>,
    /// API keys by id, revoked ones included.
    pub api_keys: OrdMap<String, ApiKey>,
    /// Revoked identities by stored name (`identity::stored_name`).
    pub revocations: OrdMap<String, Revocation>,
}

fn upsert<T: Object + Clone>(map: &mut OrdMap<String, T>, kv: &KeyValue) {
    match stored::<T>(kv) {
        Ok(object) => {
            map.insert(object.name().to_string(), object);
        }
        Err(error) => tracing::error!(%error, "skipping undecodable registry value"),
    }
}

impl Snapshot {
    /// True once the snapshot reflects etcd.
    pub fn is_synced(&self) -> bool {
        self.revision > 0
    }

    /// Every pool with the number of its serving endpoints.
    pub fn serving_per_pool(&self) -> impl Iterator<Item = (&Pool, usize)> {
        self.pools.values().map(|pool| {
            let serving = self
                .endpoints
                .values()
                .filter(|e| e.pool == pool.name && e.state == EndpointState::Serving as i32)
                .count();
            (pool, serving)
        })
    }

    /// Whether the certificate `serial` of the identity stored as `name`
    /// (`store::identity_name`) has been revoked.
    pub fn is_revoked(&self, name: &str, serial: &str) -> bool {
        self.revocations
            .get(name)
            .is_some_and(|revocation| revocation.serials.iter().any(|s| s == serial))
    }

    fn put(&mut self, keys: &Keys, kv: &KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        match keys.parse(key) {
            Some((ObjectKind::Model, _)) => upsert(&mut self.models, kv),
            Some((ObjectKind::Pool, _)) => upsert(&mut self.pools, kv),
            Some((ObjectKind::Region, _)) => upsert(&mut self.regions, kv),
            Some((ObjectKind::Endpoint, _)) => upsert(&mut self.endpoints, kv),
            Some((ObjectKind::Tenant, _)) => upsert(&mut self.tenants, kv),
            Some((ObjectKind::Adapter, _)) => upsert(&mut self.adapters, kv),
            Some((ObjectKind::ApiKey, _)) => upsert(&mut self.api_keys, kv),
            Some((ObjectKind::Revocation, name)) => match decode::<Revocation>(kv) {
                Ok(revocation) => {
                    self.revocations.insert(name.to_string(), revocation);
                }
                Err(error) => tracing::error!(%error, "skipping undecodable revocation"),
            },
            Some(_) | None => {}
        }
    }

    fn delete(&mut self, keys: &Keys, kv: &KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        match keys.parse(key) {
            Some((ObjectKind::Model, name)) => drop(self.models.remove(name)),
            Some((ObjectKind::Pool, name)) => drop(self.pools.remove(name)),
            Some((ObjectKind::Region, name)) => drop(self.regions.remove(name)),
            Some((ObjectKind::Endpoint, id)) => drop(self.endpoints.remove(id)),
            Some((ObjectKind::Tenant, name)) => drop(self.tenants.remove(name)),
            Some((ObjectKind::Adapter, name)) => drop(self.adapters.remove(name)),
            Some((ObjectKind::ApiKey, id)) => drop(self.api_keys.remove(id)),
            Some((ObjectKind::Revocation, name)) => drop(self.revocations.remove(name)),
            Some(_) | None => {}
        }
    }
}

/// Starts the watcher; the receiver always holds the latest snapshot.
pub fn spawn_watcher(
    store: Store,
    metrics: Arc<ControlPlaneMetrics>,
    cancel: CancellationToken,
) -> (watch::Receiver<Arc<Snapshot>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            match follow(&store, &tx, &metrics, &cancel, &mut backoff).await {
                Ok(()) => return,
                Err(WatchEnd::Stalled { delivered, latest }) => {
                    metrics.watch_resynced("stalled");
                    tracing::warn!(delivered, latest, after = ?STALL_AFTER, "registry watch stalled behind etcd; resyncing from etcd");
                    continue;
                }
                Err(WatchEnd::Failed(error)) => {
                    metrics.watch_resynced("failed");
                    tracing::warn!(%error, "registry watch lost; resyncing from etcd")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    });
    (rx, task)
}

/// Why a watch was given up.
enum WatchEnd {
    /// etcd or the stream failed.
    Failed(StoreError),
    /// The watch stayed behind what etcd reported for `STALL_AFTER`.
    Stalled { delivered: i64, latest: i64 },
}

impl From<StoreError> for WatchEnd {
    fn from(error: StoreError) -> Self {
        WatchEnd::Failed(error)
    }
}

impl From<etcd_client::Error> for WatchEnd {
    fn from(error: etcd_client::Error) -> Self {
        WatchEnd::Failed(error.into())
    }
}

/// Reads etcd's newest revision under `prefix` every `STALL_CHECK`, bounded
/// in time (an etcd that does not answer says nothing about the watch).
fn spawn_latest_reader(
    store: Store,
    prefix: String,
    cancel: CancellationToken,
) -> (watch::Receiver<i64>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(STALL_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match tokio::time::timeout(STALL_CHECK, store.latest_under(&prefix)).await {
                Ok(Ok(latest)) => {
                    tx.send_replace(latest);
                }
                Ok(Err(error)) => tracing::debug!(%error, "could not read etcd's newest revision"),
                Err(_) => tracing::debug!("etcd's newest revision not read in time"),
            }
        }
    });
    (rx, task)
}

/// Loads everything, then applies watch events until cancelled, the watch
/// fails, or it stalls.
async fn follow(
    store: &Store,
    tx: &watch::Sender<Arc<Snapshot>>,
    metrics: &ControlPlaneMetrics,
    cancel: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), WatchEnd> {
    let keys = store.keys().clone();
    let (kvs, revision) = store.get_prefix(keys.root()).await?;
    let mut snapshot = Snapshot {
        revision,
        ..Default::default()
    };
    for kv in &kvs {
        snapshot.put(&keys, kv);
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = store.client().watch(keys.root(), Some(options)).await?;
    tracing::info!(revision, objects = kvs.len(), "registry snapshot loaded");
    tx.send_replace(Arc::new(snapshot.clone()));
    backoff.reset();
    let reading = cancel.child_token();
    let _stop_reading = reading.clone().drop_guard();
    let (mut latest, _reader) =
        spawn_latest_reader(store.clone(), keys.root().to_string(), reading);
    let mut detector = StallDetector::new(STALL_AFTER, revision);
    metrics.watch_lag(std::time::Duration::ZERO);
    let mut reading = true;
    loop {
        let response = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            changed = latest.changed(), if reading => {
                if changed.is_err() {
                    reading = false;
                    continue;
                }
                let newest = *latest.borrow_and_update();
                let verdict = detector.observed(newest);
                metrics.watch_lag(detector.lag());
                if verdict == Verdict::Stalled {
                    return Err(WatchEnd::Stalled { delivered: detector.delivered_revision(), latest: newest });
                }
                continue;
            }
            next = stream.next() => match next {
                Some(response) => response?,
                None => return Err(etcd_client::Error::WatchError("watch stream ended".into()).into()),
            },
        };
        if let Some(header) = response.header() {
            detector.delivered(header.revision());
        }
        if response.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "watch cancelled by etcd: {}",
                response.cancel_reason()
            ))
            .into());
        }
        // Key use, load digests, scaling decisions and the leader's key change
        // often and are in no table: skip the rebuild they would cause.
        let relevant = response.events().iter().any(|event| {
            event
                .kv()
                .and_then(|kv| kv.key_str().ok())
                .and_then(|key| keys.parse(key))
                .is_some_and(|(kind, _)| kind.in_tables())
        });
        if !relevant {
            continue;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => snapshot.put(&keys, kv),
                EventType::Delete => snapshot.delete(&keys, kv),
            }
        }
        if let Some(header) = response.header() {
            snapshot.revision = header.revision();
        }
        tx.send_replace(Arc::new(snapshot.clone()));
    }
}
