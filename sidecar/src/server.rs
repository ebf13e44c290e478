//! Starts the sidecar and owns its shutdown sequence: on SIGTERM, a drain
//! directive or a preStop hook, report draining, wait until edges see it
//! (bounded), let in-flight requests finish (bounded), answer the preStop
//! hooks, then close the listener and exit (after SIGTERM, when a hook
//! started it).

use std::time::Duration;

use infermesh_proto::v1::{EndpointState, Load, Register, SubscriberRole};
use infermesh_runtime::backoff::Backoff;
use infermesh_runtime::discovery::{self, DiscoveryConfig, Identity};
use infermesh_runtime::http::ServeOptions;
use infermesh_runtime::tls::{self, mesh::MeshTls};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::assignment::AssignmentReader;
use crate::config::Config;
use crate::engine::scrape::Scraper;
use crate::gpu::GpuTelemetry;
use crate::metrics::SidecarMetrics;
use crate::proxy::{EngineProxy, Readiness};
use crate::report::Reporter;

/// Runs the sidecar until `stop` fires (SIGTERM) and the drain completes.
pub async fn run(mut config: Config, stop: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let endpoint_id = config.endpoint_id().map_err(anyhow::Error::msg)?;
    let address = config.advertise_address().map_err(anyhow::Error::msg)?;
    let background = CancellationToken::new();
    let renewal = config
        .enroll
        .enroll(
            &config.control_plane,
            &mut config.control_plane_tls,
            Some(endpoint_id.clone()),
            background.clone(),
        )
        .await
        .map_err(anyhow::Error::msg)?;
    let control_plane = config
        .control_plane_tls
        .client()
        .map_err(anyhow::Error::msg)?;
    let client = infermesh_runtime::http::upstream_client(Duration::from_secs(2));

    let registry = infermesh_runtime::metrics::registry(&[
        ("endpoint", &endpoint_id),
        ("pool", &config.pool),
        ("model", &config.model),
        ("region", &config.region),
    ]);
    let metrics = SidecarMetrics::register(&registry)?;
    let (_, metrics_task) =
        infermesh_runtime::metrics::spawn(config.metrics_listen, registry, background.clone())
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {}: {e}", config.metrics_listen))?;
    let gpu = if config.gpu_telemetry {
        GpuTelemetry::open(config.nvml_library.as_deref())
    } else {
        GpuTelemetry::Unavailable("--gpu-telemetry false".into())
    };

    let adapters = std::sync::Arc::new(crate::adapters::Adapters::new(
        client.clone(),
        &config.engine_url,
        config.engine,
        config.max_adapters,
    ));
    let (loads_tx, loads) = watch::channel(Load::default());
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let scraper = Scraper::new(
        client.clone(),
        config.engine,
        &config.engine_url,
        Duration::from_millis(config.scrape_timeout_ms),
    )?
    .with_telemetry(gpu, metrics.clone())
    .counting(requests.clone())
    .with_adapters(adapters.clone());
    let scrape_task =
        tokio::spawn(scraper.run(config.scrape_interval(), loads_tx, background.clone()));

    let (draining_tx, draining) = watch::channel(false);
    let reporter = Reporter {
        control_planes: config.control_plane.clone(),
        client: control_plane.clone(),
        register: Register {
            endpoint_id: endpoint_id.clone(),
            pool: config.pool.clone(),
            model: config.model.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            address: address.clone(),
            engine: config.engine.to_proto() as i32,
            fingerprint: config.fingerprint(),
        },
        default_interval: config.scrape_interval(),
    };
    let (report_status, report_task) =
        reporter.spawn(loads.clone(), draining.clone(), background.clone());
    let age_task = tokio::spawn(track_report_age(
        report_status.last_sent_unix_ms.clone(),
        metrics.clone(),
        config.scrape_interval(),
        background.clone(),
    ));

    let (assignment, discovery_task) = discovery::subscribe(
        DiscoveryConfig {
            control_planes: config.control_plane.clone(),
            client: control_plane,
            identity: Identity {
                role: SubscriberRole::Sidecar,
                region: config.region.clone(),
                node_id: endpoint_id.clone(),
            },
            connect_timeout: Duration::from_secs(3),
            backoff: Backoff::default(),
            quota: None,
            usage_interval: Duration::from_millis(200),
            demand: None,
            loans: None,
        },
        AssignmentReader {
            endpoint_id: endpoint_id.clone(),
        },
        background.clone(),
    );

    let adapters_task = tokio::spawn(follow_adapters(
        assignment.tables.clone(),
        adapters.clone(),
        background.clone(),
    ));
    let in_flight = crate::drain::InFlight::default();
    let pre_stop = crate::drain::PreStop::default();
    let proxy = EngineProxy::new(
        client,
        config.engine_url.clone(),
        Readiness {
            loads,
            draining: draining.clone(),
            in_flight: in_flight.clone(),
        },
    )
    .with_metrics(metrics)
    .counting(requests)
    .with_adapters(adapters);
    let (proxy, tls) = match config.serve_tls {
        MeshTls::Off => (proxy, None),
        MeshTls::Mutual => {
            let (ca, cert, key) = config
                .control_plane_tls
                .identity_files()
                .map_err(anyhow::Error::msg)?;
            // Probes and kubelets carry no certificate: client certificates
            // are optional at the handshake and required by the proxy.
            let tls = tls::server_config(
                &cert,
                &key,
                Some(&ca),
                tls::ClientAuth::Optional,
                tls::server::HTTP_ALPN,
                tls::server::DEFAULT_RELOAD_INTERVAL,
                background.clone(),
            )
            .map_err(|e| anyhow::anyhow!("--serve-tls mutual: {e}"))?;
            (proxy.edges_only(), Some(tls))
        }
    };
    let hook = match &config.prestop_socket {
        Some(socket) => Some(
            crate::prestop::serve(
                socket,
                crate::prestop::HookState {
                    pre_stop: pre_stop.clone(),
                    in_flight: in_flight.clone(),
                    limit: Duration::from_secs(
                        config.drain_wait_seconds + config.shutdown_grace_seconds,
                    ),
                },
                background.clone(),
            )
            .map_err(|e| anyhow::anyhow!("--prestop-socket {}: {e}", socket.display()))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, tls = ?config.serve_tls, advertise = %address, endpoint = %endpoint_id, engine = %config.engine_url, "sidecar serving");
    let serving = CancellationToken::new();
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let server = tokio::spawn(infermesh_runtime::http::serve(
        listener,
        proxy,
        serving.clone(),
        ServeOptions {
            body_timeout: config.body_timeout,
            tls: tls.as_ref().map(tls::ServerTls::acceptor),
            ..ServeOptions::plaintext(grace)
        },
    ));

    tokio::select! {
        _ = stop.cancelled() => tracing::info!("stopping: draining this replica"),
        _ = report_status.drain_requested.cancelled() => tracing::info!("drain requested by the control plane"),
        _ = pre_stop.requested.cancelled() => tracing::info!("preStop hook: draining this replica"),
    }
    draining_tx.send_replace(true);
    let mut tables = assignment.tables.clone();
    let edges_stopped = tables.wait_for(|t| {
        t.as_ref()
            .is_some_and(|t| !t.table.listed || t.table.state == EndpointState::Draining)
    });
    let drain_wait = Duration::from_secs(config.drain_wait_seconds);
    if tokio::time::timeout(drain_wait, edges_stopped)
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain_wait,
            "edges not confirmed to have stopped sending; closing anyway"
        );
    }
    if tokio::time::timeout(grace, in_flight.idle()).await.is_err() {
        tracing::warn!(
            in_flight = in_flight.count(),
            ?grace,
            "requests still in flight after the grace period"
        );
    }
    pre_stop.drained.cancel();
    if pre_stop.requested.is_cancelled() {
        // Drained for a preStop hook: the other containers stop now; keep
        // answering probes until Kubernetes signals this one.
        tracing::info!("drained; waiting for SIGTERM");
        stop.cancelled().await;
    }
    serving.cancel();
    let _ = server.await;
    background.cancel();
    let _ = tokio::join!(
        scrape_task,
        report_task,
        discovery_task,
        metrics_task,
        age_task,
        adapters_task
    );
    if let Some(hook) = hook {
        let _ = hook.await;
    }
    if let Some(renewal) = renewal {
        let _ = renewal.await;
    }
    tracing::info!("sidecar stopped");
    Ok(())
}

/// Keeps `adapters` on the registry's adapters of this replica's model, as
/// each sidecar table brings them.
async fn follow_adapters(
    mut tables: watch::Receiver<
        Option<std::sync::Arc<discovery::Applied<crate::assignment::Assignment>>>,
    >,
    adapters: std::sync::Arc<crate::adapters::Adapters>,
    cancel: CancellationToken,
) {
    loop {
        if let Some(applied) = tables.borrow_and_update().clone() {
            adapters.set_known(&applied.table.adapters);
        }
        tokio::select! {
            changed = tables.changed() => if changed.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

/// Sets the report-age gauge every `every` from the reporter's last send.
async fn track_report_age(
    last_sent_unix_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    metrics: SidecarMetrics,
    every: Duration,
    cancel: CancellationToken,
) {
    let started = infermesh_runtime::time::now_unix_ms();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let last = last_sent_unix_ms.load(std::sync::atomic::Ordering::Relaxed);
        let since = if last == 0 { started } else { last };
        let age_ms = (infermesh_runtime::time::now_unix_ms() - since).max(0);
        metrics.report_age(Duration::from_millis(age_ms as u64));
    }
}
