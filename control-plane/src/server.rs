//! Assembles the control plane: etcd store, watched snapshot, the three
//! services, gRPC health and reflection (v1 and v1alpha, so grpcurl 1.8
//! works without .proto files), and the shutdown path.

use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::{
    admin_service_server::AdminServiceServer, discovery_service_server::DiscoveryServiceServer,
    load_report_service_server::LoadReportServiceServer,
};
use infermesh_runtime::admin_token::TokenSet;
use infermesh_runtime::tls;
use tokio_util::sync::CancellationToken;

use crate::api::admin::Admin;
use crate::api::discovery::Discovery;
use crate::api::load_reports::{LeaseSettings, LoadReports};
use crate::auth::{Authorizer, RegistrationPolicy};
use crate::config::{Config, Transport};
use crate::fleet::{SubscriberBook, SubscriberView};
use crate::identity::IdentityApi;
use crate::metrics::ControlPlaneMetrics;
use crate::quota::QuotaBook;
use crate::registry::Registry;
use crate::snapshot;
use crate::store::Store;
use infermesh_proto::v1::identity_service_server::IdentityServiceServer;
use infermesh_runtime::tls::pki::LocalCa;

/// Runs the control plane until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let transport = config.transport().map_err(anyhow::Error::msg)?;
    let admin_tokens = match &config.admin_tokens_file {
        Some(path) => {
            TokenSet::load(path).map_err(|e| anyhow::anyhow!("--admin-tokens-file: {e}"))?
        }
        None => TokenSet::default(),
    };
    let tls = match &transport {
        Transport::Plaintext => {
            tracing::warn!(
                "--insecure-plaintext: gRPC without TLS; subscribers are not authenticated"
            );
            None
        }
        Transport::Tls {
            cert,
            key,
            client_ca,
        } => Some(
            // The serving certificate is re-read when its files change, so
            // a renewal needs no restart.
            tls::server::server_config(
                cert,
                key,
                Some(client_ca),
                tls::ClientAuth::Optional,
                &[tls::server::ALPN_H2],
                tls::server::DEFAULT_RELOAD_INTERVAL,
                cancel.child_token(),
            )
            .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key/--tls-client-ca: {e}"))?,
        ),
    };
    let registry = infermesh_runtime::metrics::registry(&[]);
    let metrics = Arc::new(ControlPlaneMetrics::register(&registry)?);
    let (_, metrics_task) =
        infermesh_runtime::metrics::spawn(config.metrics_listen, registry, cancel.clone())
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {}: {e}", config.metrics_listen))?;
    tracing::info!(etcd = ?config.etcd_endpoints, "connecting to etcd");
    let etcd_tls = config.etcd_tls().map_err(anyhow::Error::msg)?;
    let store = tokio::time::timeout(
        Duration::from_secs(10),
        Store::connect(
            &config.etcd_endpoints,
            &config.etcd_prefix,
            etcd_tls.as_ref(),
        ),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "--etcd-endpoints: no connection to {:?} within 10s",
            config.etcd_endpoints
        )
    })??
    .with_metrics(metrics.clone());
    tracing::info!("connected to etcd");
    // Leases are kept alive on a connection of their own, so that renewals
    // never queue behind a burst of registrations on the shared one.
    let lease_store = Store::connect(
        &config.etcd_endpoints,
        &config.etcd_prefix,
        etcd_tls.as_ref(),
    )
    .await?
    .with_metrics(metrics.clone());
    // A renewed etcd client certificate is used from its next call on.
    if let Some(files) = etcd_tls {
        for store in [&store, &lease_store] {
            store.reconnect_on_change(
                config.etcd_endpoints.clone(),
                files.clone(),
                tls::server::DEFAULT_RELOAD_INTERVAL,
                cancel.clone(),
            );
        }
    }
    let (snapshots, watcher) =
        snapshot::spawn_watcher(store.clone(), metrics.clone(), cancel.clone());
    let authorizer = Arc::new(
        Authorizer::new(tls.is_some(), admin_tokens)
            .with_registrations(RegistrationPolicy::new(
                config.allow_unbound_sidecars,
                config.registrations_per_minute,
            ))
            .with_revocations(snapshots.clone()),
    );
    let reclaim = tokio::spawn(crate::reclaim::hold_existing_leases(
        store.clone(),
        Duration::from_millis(u64::from(config.report_interval_ms)).max(Duration::from_millis(500)),
        Duration::from_secs(u64::from(config.endpoint_lease_ttl_seconds))
            .max(Duration::from_secs(10)),
        cancel.clone(),
    ));
    let actuator = config.actuator().map_err(anyhow::Error::msg)?.map(Arc::new);
    let (leading, election) = crate::leader::spawn(
        lease_store.clone(),
        config.node_id(),
        i64::from(config.leader_ttl_seconds),
        metrics.clone(),
        cancel.clone(),
    );
    let snapshot_gauges = tokio::spawn(follow_snapshots(
        snapshots.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let loads = Arc::new(crate::loads::LoadView::default());
    let subscribers = Arc::new(SubscriberView::new(
        &config.node_id(),
        Arc::new(SubscriberBook::default()),
    ));
    let exchange = tokio::spawn(crate::loads::exchange(
        store.clone(),
        config.node_id(),
        crate::loads::Shared {
            loads: loads.clone(),
            subscribers: subscribers.clone(),
        },
        metrics.clone(),
        Duration::from_millis(u64::from(config.load_exchange_interval_ms)),
        cancel.clone(),
    ));
    let autoscaler = crate::autoscale::Autoscaler {
        store: store.clone(),
        snapshots: snapshots.clone(),
        loads: loads.clone(),
        metrics: metrics.clone(),
        node: config.node_id(),
        interval: Duration::from_millis(u64::from(config.autoscale_interval_ms)),
        actuator,
    };
    let collector = tokio::spawn(crate::gc::run(
        store.clone(),
        snapshots.clone(),
        leading.clone(),
        Duration::from_secs(u64::from(config.gc_interval_seconds)),
        cancel.clone(),
    ));
    let autoscaling = tokio::spawn(autoscaler.run(leading.clone(), cancel.clone()));

    let explain = Arc::new(crate::fleet::ExplainDesk::default());
    let quotas = Arc::new(QuotaBook::new(snapshots.clone()));
    let admin = Admin::new(
        Registry::new(store.clone()),
        snapshots.clone(),
        loads.clone(),
        subscribers.clone(),
    )
    .explaining_through(explain.clone())
    .showing_budgets_of(quotas.clone());
    let quota_task = tokio::spawn(
        quotas
            .clone()
            .run(Registry::new(store.clone()), cancel.clone()),
    );
    let quota_exchange = tokio::spawn(quotas.clone().exchange(
        store.clone(),
        config.node_id(),
        leading.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let discovery = Discovery::new(
        snapshots.clone(),
        subscribers.local().clone(),
        quotas,
        authorizer.clone(),
        metrics.clone(),
        Arc::new(crate::autoscale::DemandBook::new(store.clone())),
        cancel.clone(),
    )
    .explaining_through(explain);
    let settings = LeaseSettings {
        ttl_seconds: config.endpoint_lease_ttl_seconds,
        report_interval: config.report_interval(),
    };
    let (replica_lease, lease_task) = crate::replica_lease::spawn(
        lease_store,
        i64::from(config.endpoint_lease_ttl_seconds.max(1)),
        cancel.clone(),
    );
    let ca = match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &std::path::Path| {
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--ca-cert/--ca-key {}: {e}", path.display()))
            };
            Some(
                LocalCa::load(&read(cert)?, &read(key)?)
                    .map_err(|e| anyhow::anyhow!("--ca-cert/--ca-key: {e}"))?,
            )
        }
        _ => None,
    };
    let identities = IdentityApi::new(store.clone(), authorizer.clone(), ca, config.identity_ttl)
        .with_token_review(config.token_reviewer().map_err(anyhow::Error::msg)?);
    let load_reports = LoadReports::new(
        store,
        replica_lease,
        loads.local().clone(),
        settings,
        authorizer.clone(),
        metrics.clone(),
        cancel.clone(),
    );

    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(infermesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(infermesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Serving only once the registry is loaded keeps probes honest. The
    // initial NOT_SERVING must be set before the task that may flip it.
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let mut ready = snapshots.clone();
    let reporter = health_reporter.clone();
    let readiness = tokio::spawn(async move {
        if ready.wait_for(|s| s.is_synced()).await.is_ok() {
            reporter.set_serving::<AdminServiceServer<Admin>>().await;
            reporter
                .set_serving::<DiscoveryServiceServer<Discovery>>()
                .await;
            reporter
                .set_serving::<LoadReportServiceServer<LoadReports>>()
                .await;
            reporter
                .set_serving::<IdentityServiceServer<IdentityApi>>()
                .await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        }
    });

    let webhook = match (
        &config.webhook_listen,
        &config.webhook_tls_cert,
        &config.webhook_tls_key,
    ) {
        (Some(listen), Some(cert), Some(key)) => {
            let server = crate::webhook::WebhookServer {
                listen: *listen,
                cert: cert.clone(),
                key: key.clone(),
                injection: crate::webhook::Injection {
                    image: config.sidecar_image.clone(),
                    control_plane: config.sidecar_control_plane.clone(),
                    tls_secret: Some(config.sidecar_tls_secret.clone()).filter(|s| !s.is_empty()),
                    proxy_port: 8081,
                    metrics_port: 9091,
                    issued_identities: (config.sidecar_identity
                        == crate::config::SidecarIdentity::Issued)
                        .then(|| crate::webhook::IssuedIdentities {
                            audience: config.token_audience.clone(),
                        }),
                },
            };
            Some(crate::webhook::start(server, cancel.clone()).await?)
        }
        _ => None,
    };
    tracing::info!(listen = %config.listen, tls = tls.is_some(), etcd = ?config.etcd_endpoints, prefix = %config.etcd_prefix, "control plane starting");
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let builder = tonic::transport::Server::builder();
    let admin_auth = authorizer.clone();
    let admin = AdminServiceServer::with_interceptor(admin, move |request: tonic::Request<()>| {
        let caller = admin_auth.admin(&request)?;
        tracing::debug!(%caller, "admin call");
        Ok(request)
    });
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(DiscoveryServiceServer::new(discovery))
        .add_service(LoadReportServiceServer::new(load_reports))
        .add_service(IdentityServiceServer::new(identities));
    let shutdown = cancel.clone().cancelled_owned();
    match tls {
        Some(tls) => {
            let incoming = tls::tls_incoming(listener, tls.acceptor(), cancel.child_token());
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
            tls.watcher.stop().await;
        }
        None => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
    }
    cancel.cancel();
    readiness.abort();
    let _ = quota_task.await;
    let _ = watcher.await;
    let _ = tokio::join!(
        snapshot_gauges,
        metrics_task,
        election,
        reclaim,
        exchange,
        autoscaling,
        quota_exchange,
        collector,
        lease_task
    );
    if let Some(webhook) = webhook {
        let _ = webhook.await;
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// Keeps the snapshot-derived gauges current.
async fn follow_snapshots(
    mut snapshots: tokio::sync::watch::Receiver<Arc<crate::snapshot::Snapshot>>,
    metrics: Arc<ControlPlaneMetrics>,
    cancel: CancellationToken,
) {
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        metrics.snapshot(snapshot.revision, snapshot.serving_per_pool());
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
    }
}
