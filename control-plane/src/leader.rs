//! Leader election among control-plane replicas, through etcd's election
//! API on a lease: every replica campaigns; the winner holds leadership
//! while it keeps its lease alive, and loses it (another replica wins
//! within the lease TTL) when it stops, crashes or is cut off from etcd.
//! Every replica serves admin calls and streams; the leader is the one that
//! runs singletons, and `infermesh_control_plane_leader` says which it is.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, ResignOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::ControlPlaneMetrics;
use crate::store::Store;
use infermesh_runtime::backoff::Backoff;

/// Starts campaigning as `node`; the receiver says whether this replica leads.
pub fn spawn(
    store: Store,
    node: String,
    ttl_seconds: i64,
    metrics: Arc<ControlPlaneMetrics>,
    cancel: CancellationToken,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let name = format!("{}leader", store.keys().root());
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                outcome = term(&store, &name, &node, ttl_seconds, &tx, &metrics, &cancel) => outcome,
            };
            tx.send_replace(false);
            metrics.leader.set(0);
            match outcome {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "leadership lost or campaign failed; campaigning again")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        tx.send_replace(false);
        metrics.leader.set(0);
    });
    (rx, task)
}

/// One lease: campaign, lead while the lease lives; `Ok` only when cancelled.
async fn term(
    store: &Store,
    name: &str,
    node: &str,
    ttl_seconds: i64,
    leading: &watch::Sender<bool>,
    metrics: &ControlPlaneMetrics,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let lease = store
        .grant_lease(ttl_seconds)
        .await
        .map_err(|e| format!("lease: {e}"))?;
    let (mut keeper, mut responses) = store
        .keep_alive(lease)
        .await
        .map_err(|e| format!("keep-alive: {e}"))?;
    let mut tick = tokio::time::interval(Duration::from_secs((ttl_seconds as u64 / 3).max(1)));
    let mut election = store.client().election_client();
    // The lease must stay alive while the campaign waits for its turn.
    let campaign = election.campaign(name, node, lease);
    tokio::pin!(campaign);
    let won = loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = store.revoke_lease(lease).await;
                return Ok(());
            }
            won = &mut campaign => break won.map_err(|e| format!("campaign: {e}"))?,
            _ = tick.tick() => renew(&mut keeper, &mut responses).await?,
        }
    };
    tracing::info!(%node, lease, "leading the control plane");
    leading.send_replace(true);
    metrics.leader.set(1);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                if let Some(key) = won.leader() {
                    let resign = ResignOptions::new().with_leader(key.clone());
                    let _ = store.client().election_client().resign(Some(resign)).await;
                }
                let _ = store.revoke_lease(lease).await;
                return Ok(());
            }
            _ = tick.tick() => renew(&mut keeper, &mut responses).await?,
        }
    }
}

/// Renews the lease; an error when etcd says it is gone or cannot be reached.
async fn renew(
    keeper: &mut LeaseKeeper,
    responses: &mut LeaseKeepAliveStream,
) -> Result<(), String> {
    keeper
        .keep_alive()
        .await
        .map_err(|e| format!("keep-alive: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), responses.message()).await {
        Ok(Ok(Some(response))) if response.ttl() > 0 => Ok(()),
        Ok(Ok(Some(_))) => Err("the lease expired".into()),
        Ok(Ok(None)) => Err("keep-alive stream closed".into()),
        Ok(Err(error)) => Err(format!("keep-alive: {error}")),
        Err(_) => Err("no keep-alive answer within 5 s".into()),
    }
}
