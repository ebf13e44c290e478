//! Starts the edge: subscribes to routing tables, then serves the request
//! path until shutdown, draining open connections for the grace period.

use std::time::Duration;

use infermesh_proto::v1::SubscriberRole;
use infermesh_runtime::backoff::Backoff;
use infermesh_runtime::discovery::{self, DiscoveryConfig, Identity};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::gateway::Gateway;
use crate::stack;
use crate::table::EdgeTableBuilder;

/// Runs the edge until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let node_id = config.node_id();
    let discovery_config = DiscoveryConfig {
        control_planes: config.control_plane.clone(),
        identity: Identity {
            role: SubscriberRole::Edge,
            region: config.region.clone(),
            node_id: node_id.clone(),
        },
        connect_timeout: Duration::from_secs(3),
        backoff: Backoff::default(),
    };
    let (subscription, discovery_task) = discovery::subscribe(
        discovery_config,
        EdgeTableBuilder::default(),
        cancel.child_token(),
    );
    let gateway = Gateway::new(
        subscription.tables.clone(),
        Forwarder::new(config.connect_timeout(), config.response_timeout()),
    );
    let service = stack::build(gateway, config.max_body_bytes);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, region = %config.region, node = %node_id, "edge serving");
    infermesh_runtime::http::serve(
        listener,
        service,
        cancel.clone(),
        Duration::from_secs(config.shutdown_grace_seconds),
    )
    .await;
    cancel.cancel();
    let _ = discovery_task.await;
    tracing::info!("edge stopped");
    Ok(())
}
