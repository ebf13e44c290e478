//! After a control plane starts, the replicas registered before it (by a
//! replica that died, or by itself before a restart) still have endpoint
//! keys bound to leases nobody renews. Their sidecars reconnect with
//! backoff, possibly after those leases would run out, and the endpoints
//! would vanish from every table for a moment though the replicas serve.
//! So for a window after start the control plane renews those leases
//! itself; a sidecar that re-registers binds its endpoint to a new lease,
//! and the old one is left to expire once the window closes. A replica
//! that is really gone leaves when the window ends plus the lease TTL.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{ObjectKind, Store};

/// Renews the leases of the endpoints registered now, every `every`, for `window`.
pub async fn hold_existing_leases(
    store: Store,
    every: Duration,
    window: Duration,
    cancel: CancellationToken,
) {
    let dir = store.keys().dir(ObjectKind::Endpoint);
    let leases: HashSet<i64> = match store.get_prefix(&dir).await {
        Ok((kvs, _)) => kvs
            .iter()
            .map(|kv| kv.lease())
            .filter(|l| *l != 0)
            .collect(),
        Err(error) => {
            tracing::warn!(%error, "could not read registered endpoints to hold their leases");
            return;
        }
    };
    if leases.is_empty() {
        return;
    }
    tracing::info!(
        leases = leases.len(),
        ?window,
        "holding registered endpoints' leases while their sidecars reconnect"
    );
    let mut keepers = Vec::new();
    for lease in leases {
        match store.keep_alive(lease).await {
            Ok((keeper, responses)) => keepers.push((keeper, responses)),
            Err(error) => tracing::debug!(lease, %error, "lease already gone"),
        }
    }
    let deadline = tokio::time::Instant::now() + window;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tick.tick() => {
                for (keeper, _) in &mut keepers {
                    let _ = keeper.keep_alive().await;
                }
            }
        }
    }
}
