//! Garbage collection, run by the leading replica: records that outlived
//! their object (a key's last-use time written just after the key was
//! deleted, a decision for a deleted pool) and records of certificates
//! that have all expired (issued identities, revocations) are removed
//! every interval.
//! Leased records (endpoints, digests, demand) need no collection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::snapshot::Snapshot;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use infermesh_proto::v1::{IssuedIdentity, Revocation};

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
        removed += usize::from(delete_when(store, compare, record).await?);
    }
    removed += collect_expired(store).await?;
    Ok(removed)
}

/// Removes issued-identity records and revocations whose certificates have
/// all expired, each only if unchanged since it was read.
async fn collect_expired(store: &Store) -> Result<usize, StoreError> {
    let keys = store.keys();
    let now = infermesh_runtime::time::now_unix_ms();
    let (issued, _) = store
        .get_prefix(&keys.dir(ObjectKind::IssuedIdentity))
        .await?;
    let (revocations, _) = store.get_prefix(&keys.dir(ObjectKind::Revocation)).await?;
    let mut expired = Vec::new();
    for kv in &issued {
        if let Ok(record) = crate::store::decode::<IssuedIdentity>(kv)
            && record
                .certificates
                .iter()
                .all(|c| c.not_after_unix_ms <= now)
        {
            expired.push(kv);
        }
    }
    for kv in &revocations {
        if let Ok(revocation) = crate::store::decode::<Revocation>(kv)
            && revocation.expires_at_unix_ms <= now
        {
            expired.push(kv);
        }
    }
    let mut removed = 0;
    for kv in expired {
        let key = kv.key().to_vec();
        let compare = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
        removed += usize::from(delete_when(store, compare, key).await?);
    }
    Ok(removed)
}

/// Deletes `key` if `compare` holds; whether it did.
async fn delete_when(
    store: &Store,
    compare: Compare,
    key: impl Into<Vec<u8>>,
) -> Result<bool, StoreError> {
    let key = key.into();
    let done = store
        .call("txn", |mut client| {
            let txn = Txn::new()
                .when(vec![compare.clone()])
                .and_then(vec![TxnOp::delete(key.clone(), None)]);
            async move { client.txn(txn).await }
        })
        .await?;
    Ok(done.succeeded())
}
