//! The watched snapshot: every registry object and endpoint under the
//! prefix, kept current by one etcd watch and published whole through a
//! `watch` channel. Readers take an `Arc` and never block the watcher. The
//! maps are persistent (`imbl::OrdMap`): publishing a snapshot after each
//! event shares every unchanged node with the previous one instead of
//! copying thousands of endpoints.
//! Revision 0 means "not synced yet": nothing may be pushed from it.

use std::sync::Arc;

use etcd_client::{EventType, KeyValue, WatchOptions};
use futures_util::StreamExt;
use imbl::OrdMap;
use infermesh_proto::v1::{ApiKey, Endpoint, Model, Pool, Region, Tenant};
use infermesh_runtime::backoff::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::objects::{Object, stored};
use crate::store::{Keys, ObjectKind, Store, StoreError};

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
    /// API keys by id, revoked ones included.
    pub api_keys: OrdMap<String, ApiKey>,
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

    fn put(&mut self, keys: &Keys, kv: &KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        match keys.parse(key) {
            Some((ObjectKind::Model, _)) => upsert(&mut self.models, kv),
            Some((ObjectKind::Pool, _)) => upsert(&mut self.pools, kv),
            Some((ObjectKind::Region, _)) => upsert(&mut self.regions, kv),
            Some((ObjectKind::Endpoint, _)) => upsert(&mut self.endpoints, kv),
            Some((ObjectKind::Tenant, _)) => upsert(&mut self.tenants, kv),
            Some((ObjectKind::ApiKey, _)) => upsert(&mut self.api_keys, kv),
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
            Some((ObjectKind::ApiKey, id)) => drop(self.api_keys.remove(id)),
            Some(_) | None => {}
        }
    }
}

/// Starts the watcher; the receiver always holds the latest snapshot.
pub fn spawn_watcher(
    store: Store,
    cancel: CancellationToken,
) -> (watch::Receiver<Arc<Snapshot>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            match follow(&store, &tx, &cancel, &mut backoff).await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, "registry watch lost; resyncing from etcd"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    });
    (rx, task)
}

/// Loads everything, then applies watch events until cancelled or the watch fails.
async fn follow(
    store: &Store,
    tx: &watch::Sender<Arc<Snapshot>>,
    cancel: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), StoreError> {
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
    loop {
        let response = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = stream.next() => match next {
                Some(response) => response?,
                None => return Err(etcd_client::Error::WatchError("watch stream ended".into()).into()),
            },
        };
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
