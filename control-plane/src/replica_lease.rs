//! The one etcd lease a control-plane replica binds every endpoint it
//! registers to. One lease per replica instead of one per endpoint keeps
//! etcd's keep-alive traffic flat as the fleet grows (10,000 endpoints were
//! 6,000 keep-alives a second with the default TTL). An endpoint whose
//! sidecar goes away is deleted explicitly; the endpoints of a replica that
//! dies leave with its lease, unless their sidecars have re-registered with
//! another replica first, which rebinds them to that replica's lease.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
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
) -> (ReplicaLease, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let missing = Arc::new(Notify::new());
    let reported = missing.clone();
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
                        _ = reported.notified() => format!("etcd refused a write under lease {id}: not found"),
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
    (
        ReplicaLease {
            current: rx,
            missing,
        },
        task,
    )
}

/// The replica lease's id as it changes, and a way to report it missing.
#[derive(Clone)]
pub struct ReplicaLease {
    /// The lease now; `None` while there is none.
    pub current: watch::Receiver<Option<i64>>,
    missing: Arc<Notify>,
}

impl ReplicaLease {
    /// A write bound to `lease` was refused because etcd no longer has it:
    /// take a new lease now rather than at the next renewal.
    pub fn report_missing(&self, lease: i64) {
        if *self.current.borrow() == Some(lease) {
            self.missing.notify_one();
        }
    }
}

/// Whether `error` is etcd saying the lease a write was bound to is gone.
pub fn lease_missing(error: &crate::store::StoreError) -> bool {
    match error {
        crate::store::StoreError::Etcd(error @ etcd_client::Error::GRpcStatus(status)) => {
            crate::store::lease_gone(error) && status.message().contains("lease")
        }
        _ => false,
    }
}

/// Renews `lease` every sixth of its TTL on one keep-alive stream (opened
/// again when it fails) until etcd says it has expired; why it was lost. A
/// renewal that fails or is slow (etcd down or overloaded) is retried: only
/// etcd's own word ends the lease, so a slow etcd never makes every
/// endpoint register again at once.
async fn hold(store: &Store, lease: i64, ttl_seconds: i64) -> String {
    let ttl = Duration::from_secs(ttl_seconds.max(1) as u64);
    let mut tick = tokio::time::interval(ttl / 6);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream = None;
    loop {
        tick.tick().await;
        if stream.is_none() {
            match tokio::time::timeout(ttl, store.client().lease_keep_alive(lease)).await {
                Ok(Ok(opened)) => stream = Some(opened),
                Ok(Err(error)) => {
                    tracing::debug!(lease, %error, "replica lease keep-alive not opened; retrying");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(
                        lease,
                        "replica lease keep-alive not opened in time; retrying"
                    );
                    continue;
                }
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            continue;
        };
        let renewed = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(ttl, renewed).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return format!("lease {lease} has expired"),
            Ok(Err(error)) if crate::store::lease_gone(&error) => {
                return format!("lease {lease} has expired ({error})");
            }
            other => {
                tracing::debug!(lease, outcome = ?other.map(|r| r.map(|_| ())), "replica lease renewal failed; reopening");
                stream = None;
            }
        }
    }
}
