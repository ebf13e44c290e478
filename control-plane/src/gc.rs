//! Garbage collection, run by the leading replica: records that outlived
//! their object (a key's last-use time written just after the key was
//! deleted, a decision for a deleted pool) are removed every interval.
//! Leased records (endpoints, digests, demand) need no collection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::snapshot::Snapshot;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::store::{ObjectKind, Store, StoreError};

/// Removes orphaned records while this replica leads, every `interval`.
pub async fn run(
    store: Store,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    mut leading: watch::Receiver<bool>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !*leading.borrow_and_update() {
            continue;
        }
        let snapshot = snapshots.borrow().clone();
        if !snapshot.is_synced() {
            continue;
        }
        match collect(&store, &snapshot).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "orphaned records removed"),
            Err(error) => {
                tracing::warn!(%error, "garbage collection failed; trying again next round")
            }
        }
    }
}

/// One pass; how many records it removed.
pub async fn collect(store: &Store, snapshot: &Snapshot) -> Result<usize, StoreError> {
    let keys = store.keys();
    let (uses, _) = store.get_prefix(&keys.dir(ObjectKind::KeyUse)).await?;
    let (decisions, _) = store.get_prefix(&keys.dir(ObjectKind::Scaling)).await?;
    let mut removed = 0;
    for kv in uses.iter().chain(&decisions) {
        let Some((kind, name)) = kv.key_str().ok().and_then(|k| keys.parse(k)) else {
            continue;
        };
        let owner = match kind {
            ObjectKind::KeyUse if !snapshot.api_keys.contains_key(name) => ObjectKind::ApiKey,
            ObjectKind::Scaling if !snapshot.pools.contains_key(name) => ObjectKind::Pool,
            _ => continue,
        };
        // Deleted only if the owner is absent in etcd itself, in the same
        // transaction: an object created since the snapshot keeps its record.
        let record = keys.object(kind, name);
        let compare = Compare::version(keys.object(owner, name), CompareOp::Equal, 0);
        let done = store
            .call("txn", |mut client| {
                let txn = Txn::new()
                    .when(vec![compare.clone()])
                    .and_then(vec![TxnOp::delete(record.clone(), None)]);
                async move { client.txn(txn).await }
            })
            .await?;
        removed += usize::from(done.succeeded());
    }
    Ok(removed)
}
