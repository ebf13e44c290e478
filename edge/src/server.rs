//! Starts the edge: subscribes to routing tables, then serves the request
//! path until shutdown, draining open connections for the grace period.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::SubscriberRole;
use infermesh_runtime::backoff::Backoff;
use infermesh_runtime::discovery::{
    self, Applied, DemandBoard, DiscoveryConfig, Identity, Subscription,
};
use infermesh_runtime::http::{HttpService, ServeOptions};
use infermesh_runtime::loans::LoanDesk;
use infermesh_runtime::tls::server::{HTTP_ALPN, ServerTls};
use infermesh_runtime::tls::{self, ClientAuth};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::cache::store::{CacheStore, MemoryStore, RedisStore};
use crate::cache::{CacheConfig, ResponseCache};
use crate::config::CacheBackend;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::gateway::{Explaining, Gateway, Resilience};
use crate::health::{EjectionPolicy, RetryBudget};
use crate::layers::auth::AuthLayer;
use crate::layers::auth_failures::AuthFailures;
use crate::layers::catch_panic::CatchPanicLayer;
use crate::layers::edges_only::EdgesOnly;
use crate::metrics::{EdgeMetrics, Observer};
use crate::quota::Limiter;
use crate::stack;
use crate::table::{EdgeTable, EdgeTableBuilder, ObjectKind};
use crate::table_store::TableStore;
use infermesh_runtime::discovery::ApplyTable;

/// Runs the edge until `cancel` fires.
pub async fn run(mut config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let _renewal = enroll(&mut config, &cancel).await?;
    let node_id = config.node_id();
    let log = access_log(&config);
    let registry = infermesh_runtime::metrics::registry(&[("region", &config.region)]);
    let metrics = Arc::new(EdgeMetrics::register(&registry)?);
    let loans = Arc::new(LoanDesk::default());
    let limiter = limiter(&config, &metrics, loans.clone());
    let demand = Arc::new(DemandBoard::default());
    let discovery_config =
        discovery_config(&config, &node_id, limiter.clone(), demand.clone(), loans)?;
    let (builder, initial) = saved_table(config.table_cache.as_deref());
    let (subscription, discovery_task) = discovery::subscribe_from(
        discovery_config,
        Explaining(builder),
        initial,
        cancel.child_token(),
    );
    let (_, metrics_task) = infermesh_runtime::metrics::spawn(
        config.metrics_listen,
        registry.clone(),
        cancel.child_token(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("--metrics-listen {}: {e}", config.metrics_listen))?;
    let gauges = tokio::spawn(follow_subscription(
        Subscription {
            tables: subscription.tables.clone(),
            connected: subscription.connected.clone(),
            sync: subscription.sync.clone(),
        },
        metrics.clone(),
        cancel.child_token(),
    ));
    let panics = metrics.panics.clone();
    let observer = Observer::new(log, metrics.clone());
    let gateway = Gateway::new(
        subscription.tables.clone(),
        Forwarder::new(
            deadlines(&config),
            upstream_tls(&config, cancel.child_token())?,
        ),
        limiter.clone(),
        observer.clone(),
        response_cache(&config, &registry, cancel.child_token())?,
        resilience(&config),
    )
    .with_demand(demand)
    .with_sync(subscription.sync.clone())
    .with_keepalive(Duration::from_millis(config.sse_keepalive_ms));
    let auth = auth_layer(&config, subscription.tables.clone(), &metrics, &observer)
        .counting_in(limiter.clone());
    let service = stack::build(
        gateway,
        auth,
        config.max_body_bytes,
        CatchPanicLayer::counted_in(panics),
    );
    let mut options = serve_options(&config);
    let tls = client_tls(&config, cancel.child_token())?;
    options.tls = tls.as_ref().map(ServerTls::acceptor);
    let mesh = serve_mesh(&config, service.clone(), &options, &cancel).await?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %listener.local_addr()?, %scheme, region = %config.region, node = %node_id, "edge serving");
    infermesh_runtime::http::serve(listener, service, cancel.clone(), options).await;
    cancel.cancel();
    if let Some((serving, tls)) = mesh {
        let _ = serving.await;
        tls.watcher.stop().await;
    }
    if let Some(tls) = tls {
        tls.watcher.stop().await;
    }
    let _ = tokio::join!(metrics_task, gauges);
    let _ = discovery_task.await;
    tracing::info!("edge stopped");
    Ok(())
}

/// Authentication by API key against the tables as they come, limiting
/// and counting failed attempts per client address.
fn auth_layer(
    config: &Config,
    tables: tokio::sync::watch::Receiver<Option<Arc<Applied<EdgeTable>>>>,
    metrics: &EdgeMetrics,
    observer: &Observer,
) -> AuthLayer {
    if config.allow_anonymous {
        tracing::warn!("--allow-anonymous: requests without an API key are served without limits");
    }
    let failures = AuthFailures::new(config.auth_failures_per_minute)
        .counted_in(metrics.auth_failures.clone());
    AuthLayer::new(tables, config.allow_anonymous)
        .limiting_failures(failures)
        .observed_by(observer.clone())
}

/// With --identity-dir: gets or renews the edge's identity and points the
/// control-plane TLS at it; returns the task that renews it.
async fn enroll(
    config: &mut Config,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    config
        .enroll
        .enroll(
            &config.control_plane,
            &mut config.control_plane_tls,
            None,
            cancel.child_token(),
        )
        .await
        .map_err(anyhow::Error::msg)
}

/// The access log the flags ask for: a JSON line per request on stdout,
/// or none.
fn access_log(config: &Config) -> AccessLog {
    if config.access_log {
        AccessLog::stdout()
    } else {
        AccessLog::disabled()
    }
}

/// The rate limiter: borrowing from the control plane's reserve through
/// `loans`, counting the loans in `metrics`.
fn limiter(config: &Config, metrics: &EdgeMetrics, loans: Arc<LoanDesk>) -> Arc<Limiter> {
    Arc::new(
        Limiter::new(config.default_completion_reserve)
            .borrowing_through(loans, Duration::from_millis(config.quota_borrow_wait_ms))
            .counting_loans_in(metrics.loans.clone()),
    )
}

/// How the edge subscribes to routing tables: as an edge of its region,
/// exchanging quota usage and loans and signalling demand for pools with
/// no replica.
fn discovery_config(
    config: &Config,
    node_id: &str,
    limiter: Arc<Limiter>,
    demand: Arc<DemandBoard>,
    loans: Arc<LoanDesk>,
) -> anyhow::Result<DiscoveryConfig> {
    let client = config
        .control_plane_tls
        .client()
        .map_err(anyhow::Error::msg)?;
    Ok(DiscoveryConfig {
        control_planes: config.control_plane.clone(),
        client,
        identity: Identity {
            role: SubscriberRole::Edge,
            region: config.region.clone(),
            node_id: node_id.to_string(),
        },
        connect_timeout: Duration::from_secs(3),
        backoff: Backoff::default(),
        quota: Some(limiter),
        usage_interval: Duration::from_millis(config.usage_report_interval_ms),
        demand: Some(demand),
        loans: Some(loans),
    })
}

/// The table builder, saving each applied table to `--table-cache` when
/// set, and the table saved there by an earlier run, served until a
/// control plane answers (static stability). A missing or unusable saved
/// table only means waiting for a push.
fn saved_table(path: Option<&Path>) -> (EdgeTableBuilder, Option<Applied<EdgeTable>>) {
    let Some(path) = path else {
        return (EdgeTableBuilder::default(), None);
    };
    let store = TableStore::new(path.to_path_buf());
    let mut builder = EdgeTableBuilder::saving_to(store.clone());
    let initial = match store.load() {
        Ok(Some(table)) => {
            let version = table.version;
            match builder.apply(table) {
                Ok(mut table) => {
                    table.from_disk = true;
                    tracing::warn!(version, path = %path.display(), "serving the saved routing table until a control plane answers");
                    Some(Applied { version, table })
                }
                Err(error) => {
                    tracing::warn!(%error, "the saved routing table is unusable; waiting for a push");
                    None
                }
            }
        }
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%error, "could not read the saved routing table; waiting for a push");
            None
        }
    };
    (builder, initial)
}

/// How long an upstream attempt may take at each step.
fn deadlines(config: &Config) -> crate::forward::Deadlines {
    crate::forward::Deadlines {
        connect: config.connect_timeout(),
        first_byte: config.response_timeout(),
        idle: Some(config.idle_timeout()),
        total: None,
    }
}

/// Retries, their budget and the ejection of failing replicas.
fn resilience(config: &Config) -> Resilience {
    Resilience {
        budget: Arc::new(RetryBudget::new(config.retry_budget_ratio, 10)),
        max_retries: config.max_retries,
        ejection: EjectionPolicy {
            consecutive: config.eject_after_failures,
            base: Duration::from_millis(config.ejection_ms),
            max: Duration::from_secs(300),
        },
    }
}

/// Connection limits of the client listener, without TLS.
fn serve_options(config: &Config) -> ServeOptions {
    ServeOptions {
        grace: Duration::from_secs(config.shutdown_grace_seconds),
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
        max_header_bytes: config.max_header_bytes,
        tls: None,
        rest_after: Duration::from_millis(config.idle_connection_rest_ms),
        max_lingering: ServeOptions::MAX_LINGERING,
        body_timeout: config.body_timeout,
    }
}

/// TLS for clients, when --tls-cert and --tls-key are both set.
fn client_tls(config: &Config, cancel: CancellationToken) -> anyhow::Result<Option<ServerTls>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let tls = tls::server_config(
        cert,
        key,
        None,
        ClientAuth::None,
        HTTP_ALPN,
        Duration::from_millis(config.tls_reload_interval_ms),
        cancel,
    )
    .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?;
    Ok(Some(tls))
}

/// Serves peer edges on --mesh-listen, when set: mutual TLS with the mesh
/// identity, and only requests whose certificate names an edge get
/// through. Returns the serving task and the certificate watcher to stop.
async fn serve_mesh<S: HttpService>(
    config: &Config,
    service: S,
    options: &ServeOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<(JoinHandle<()>, ServerTls)>> {
    let Some(address) = config.mesh_listen else {
        return Ok(None);
    };
    let (ca, cert, key) = config
        .control_plane_tls
        .identity_files()
        .map_err(|e| anyhow::anyhow!("--mesh-listen: {e}"))?;
    let tls = tls::server_config(
        &cert,
        &key,
        Some(&ca),
        ClientAuth::Required,
        HTTP_ALPN,
        tls::server::DEFAULT_RELOAD_INTERVAL,
        cancel.child_token(),
    )
    .map_err(|e| anyhow::anyhow!("--mesh-listen: {e}"))?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("--mesh-listen {address}: {e}"))?;
    tracing::info!(listen = %listener.local_addr()?, "mesh listener serving peer edges (mutual TLS)");
    let options = ServeOptions {
        tls: Some(tls.acceptor()),
        ..options.clone()
    };
    let serving = tokio::spawn(infermesh_runtime::http::serve(
        listener,
        EdgesOnly(service),
        cancel.clone(),
        options,
    ));
    Ok(Some((serving, tls)))
}

/// The response cache the flags ask for, if any.
fn response_cache(
    config: &Config,
    registry: &prometheus::Registry,
    cancel: CancellationToken,
) -> anyhow::Result<Option<Arc<ResponseCache>>> {
    let store: Arc<dyn CacheStore> = match config.cache {
        CacheBackend::None => return Ok(None),
        CacheBackend::Memory => Arc::new(MemoryStore::new(config.cache_memory_bytes)),
        CacheBackend::Redis => {
            let url = config
                .cache_redis_url
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--cache redis needs --cache-redis-url"))?;
            let timeout = Duration::from_millis(config.cache_redis_timeout_ms);
            Arc::new(RedisStore::connect(url, timeout, cancel).map_err(anyhow::Error::msg)?)
        }
    };
    let settings = CacheConfig {
        default_ttl: Duration::from_secs(config.cache_default_ttl_seconds),
        max_entry_bytes: config.cache_max_entry_bytes,
        flight_wait: Duration::from_millis(config.cache_wait_ms),
    };
    Ok(Some(ResponseCache::new(store, settings, registry)?))
}

/// Keeps the table-version, connection, skip and lag gauges current; the
/// lag grows while nothing changes, so it is also read every second.
async fn follow_subscription(
    subscription: Subscription<EdgeTable>,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) {
    let Subscription {
        mut tables,
        mut connected,
        sync,
    } = subscription;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refusals = 0;
    // Endpoints of the table last seen (whose metric series may exist),
    // compared only when a new table is applied, not on every tick.
    let mut endpoints: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut seen_version = None;
    loop {
        {
            let current = tables.borrow_and_update();
            if let Some(applied) = current.as_ref()
                && seen_version != Some(applied.version)
            {
                seen_version = Some(applied.version);
                for gone in endpoints.difference(&applied.table.endpoint_ids) {
                    metrics.forget_endpoint(gone);
                }
                endpoints.clone_from(&applied.table.endpoint_ids);
            }
            let (version, stale) = current
                .as_ref()
                .map_or((0, false), |t| (t.version, t.table.from_disk));
            metrics.table.stale.set(i64::from(stale));
            metrics
                .table
                .version
                .set(i64::try_from(version).unwrap_or(i64::MAX));
            for kind in ObjectKind::ALL {
                let count = current.as_ref().map_or(0, |t| {
                    t.table.skipped.iter().filter(|s| s.kind == kind).count()
                });
                metrics
                    .table
                    .skipped
                    .with_label_values(&[kind.as_str()])
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        metrics
            .table
            .control_plane_connected
            .set(i64::from(*connected.borrow_and_update()));
        let now_refused = sync.refusals();
        metrics
            .table
            .refusals
            .inc_by(now_refused.saturating_sub(refusals));
        refusals = now_refused;
        metrics.table.lag.set(sync.lag().as_secs_f64());
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = tables.changed() => if changed.is_err() { return },
            changed = connected.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Mutual TLS to replicas, unless --upstream-tls off.
fn upstream_tls(
    config: &Config,
    cancel: CancellationToken,
) -> anyhow::Result<Option<infermesh_runtime::tls::mesh::MeshClientTls>> {
    if config.upstream_tls == infermesh_runtime::tls::mesh::MeshTls::Off {
        return Ok(None);
    }
    let (ca, cert, key) = config
        .control_plane_tls
        .identity_files()
        .map_err(|e| anyhow::anyhow!("--upstream-tls mutual: {e}"))?;
    let tls = infermesh_runtime::tls::mesh::MeshClientTls::new(
        &ca,
        &cert,
        &key,
        infermesh_runtime::tls::server::DEFAULT_RELOAD_INTERVAL,
        cancel,
    )
    .map_err(|e| anyhow::anyhow!("--upstream-tls mutual: {e}"))?;
    Ok(Some(tls))
}
