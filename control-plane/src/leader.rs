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
use crate::store::{Store, StoreError};
use infermesh_runtime::backoff::Backoff;

/// Why a term of leadership (or the campaign for it) ended.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// No lease could be granted.
    #[error("lease: {0}")]
    Grant(#[source] StoreError),
    /// The lease's keep-alive stream could not be opened.
    #[error("keep-alive: {0}")]
    OpenKeepAlive(#[source] StoreError),
    /// A keep-alive could not be sent or its answer read.
    #[error("keep-alive: {0}")]
    KeepAlive(#[source] etcd_client::Error),
    /// The campaign call failed.
    #[error("campaign: {0}")]
    Campaign(#[source] etcd_client::Error),
    /// etcd says the lease is gone.
    #[error("the lease expired")]
    Expired,
    /// The keep-alive stream ended.
    #[error("keep-alive stream closed")]
    StreamClosed,
    /// etcd did not answer the keep-alive in time.
    #[error("no keep-alive answer within 5 s")]
    Unanswered,
}

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
) -> Result<(), ElectionError> {
    let lease = store
        .grant_lease(ttl_seconds)
        .await
        .map_err(ElectionError::Grant)?;
    let (mut keeper, mut responses) = store
        .keep_alive(lease)
        .await
        .map_err(ElectionError::OpenKeepAlive)?;
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
            won = &mut campaign => break won.map_err(ElectionError::Campaign)?,
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
) -> Result<(), ElectionError> {
    keeper
        .keep_alive()
        .await
        .map_err(ElectionError::KeepAlive)?;
    match tokio::time::timeout(Duration::from_secs(5), responses.message()).await {
        Ok(Ok(Some(response))) if response.ttl() > 0 => Ok(()),
        Ok(Ok(Some(_))) => Err(ElectionError::Expired),
        Ok(Ok(None)) => Err(ElectionError::StreamClosed),
        Ok(Err(error)) => Err(ElectionError::KeepAlive(error)),
        Err(_) => Err(ElectionError::Unanswered),
    }
}
