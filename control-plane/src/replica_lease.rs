//! The one etcd lease a control-plane replica binds every endpoint it
//! registers to. One lease per replica instead of one per endpoint keeps
//! etcd's keep-alive traffic flat as the fleet grows (10,000 endpoints were
//! 6,000 keep-alives a second with the default TTL). An endpoint whose
//! sidecar goes away is deleted explicitly; the endpoints of a replica that
//! dies leave with its lease, unless their sidecars have re-registered with
//! another replica first, which rebinds them to that replica's lease.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use infermesh_runtime::backoff::Backoff;

/// Keeps a lease of `ttl_seconds` alive; the receiver holds its id, `None`
/// while there is none (etcd unreachable, or the lease expired and a new
/// one is being granted). Not revoked on cancel: a stopping replica's
/// endpoints stay for a TTL while their sidecars move to another replica.
pub fn spawn(
    store: Store,
    ttl_seconds: i64,
    cancel: CancellationToken,
) -> (watch::Receiver<Option<i64>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let lease = tokio::select! {
                _ = cancel.cancelled() => return,
                granted = store.grant_lease(ttl_seconds) => granted,
            };
            match lease {
                Ok(id) => {
                    backoff.reset();
                    tracing::info!(lease = id, ttl_seconds, "replica lease granted");
                    tx.send_replace(Some(id));
                    let reason = tokio::select! {
                        _ = cancel.cancelled() => return,
                        reason = hold(&store, id, ttl_seconds) => reason,
                    };
                    tracing::warn!(lease = id, %reason, "replica lease lost; its endpoints register again");
                    tx.send_replace(None);
                }
                Err(error) => {
                    tracing::warn!(%error, "no replica lease yet; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    });
    (rx, task)
}

/// Renews `lease` every third of its TTL until etcd says it has expired;
/// why it was lost. A renewal that fails or is slow (etcd down or
/// overloaded) is retried: only etcd's own word ends the lease, so a slow
/// etcd never makes every endpoint register again at once.
async fn hold(store: &Store, lease: i64, ttl_seconds: i64) -> String {
    let ttl = Duration::from_secs(ttl_seconds.max(1) as u64);
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        loop {
            match store.renew_lease(lease).await {
                Ok(()) => break,
                Err(crate::store::StoreError::Lease(reason)) if reason.contains("expired") => {
                    return reason;
                }
                Err(error) => {
                    tracing::debug!(lease, %error, "replica lease renewal failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
