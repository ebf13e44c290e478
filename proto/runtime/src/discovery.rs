//! The subscriber side of `DiscoveryService`: one long-lived stream to a
//! control plane, every table validated by the caller before it is applied,
//! ACKed when applied and NACKed (keeping the old one) when refused.
//! Reconnects with jittered backoff, rotating through the control-plane
//! addresses, and resumes from the version it holds.
//!
//! It owns no routing logic: what a table means is the caller's `ApplyTable`.
//! Edges also carry rate-limit traffic on the same stream (usage reports
//! out, quota grants in) through a `QuotaExchange`.

use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::control_plane::ControlPlaneClient;
use crate::table_delta;
use infermesh_proto::v1::{
    Ack, ExplainAnswer, ExplainQuery, Hello, Nack, QuotaGrants, RouteExplanation, RoutingTable,
    SubscribeRequest, SubscriberRole, UsageReport,
    discovery_service_client::DiscoveryServiceClient, subscribe_request,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Turns a pushed table into the subscriber's own validated form.
pub trait ApplyTable: Send + 'static {
    /// The subscriber's domain view of a table.
    type Table: Send + Sync + 'static;
    /// Why a table is refused; its text is the NACK reason.
    type Error: std::fmt::Display;
    /// Validates a table; an `Err` is sent back as the NACK reason.
    fn apply(&mut self, table: RoutingTable) -> Result<Self::Table, Self::Error>;

    /// Which replica a request would go to under `table`, and why, for the
    /// control plane's ExplainRoute; `Err` says why there is no answer.
    /// Subscribers that route no requests keep this default.
    fn explain(
        &self,
        _table: &Self::Table,
        _query: &ExplainQuery,
    ) -> Result<RouteExplanation, String> {
        Err("this subscriber routes no requests".to_string())
    }
}

/// The rate-limit side of an edge's stream.
pub trait QuotaExchange: Send + Sync + 'static {
    /// A stream opened: counters reported from now on start from zero.
    fn stream_opened(&self);
    /// The stream ended: grants received on it are no longer kept current.
    fn stream_closed(&self);
    /// Counters to report now, or `None` when nothing changed since the last report.
    fn usage(&self) -> Option<UsageReport>;
    /// A share-out arrived.
    fn grants(&self, grants: QuotaGrants);
}

/// A table the subscriber accepted, with the version it came with.
#[derive(Debug)]
pub struct Applied<T> {
    /// The control plane's version of the table.
    pub version: u64,
    /// The subscriber's view of it.
    pub table: T,
}

/// Who subscribes, as told in `Hello`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Edge or sidecar.
    pub role: SubscriberRole,
    /// Region served.
    pub region: String,
    /// Unique id of this subscriber.
    pub node_id: String,
}

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Control-plane addresses (`host:port` or a URL), tried in turn.
    pub control_planes: Vec<String>,
    /// How to connect to them (TLS, client certificate).
    pub client: ControlPlaneClient,
    /// Who we are.
    pub identity: Identity,
    /// Limit on establishing one connection.
    pub connect_timeout: Duration,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// Edges: where usage comes from and grants go.
    pub quota: Option<Arc<dyn QuotaExchange>>,
    /// How often usage is reported.
    pub usage_interval: Duration,
    /// Edges: pools requests are held for, sent as `Demand`.
    pub demand: Option<Arc<DemandBoard>>,
    /// Edges: quota units asked of the control plane's reserve.
    pub loans: Option<Arc<crate::loans::LoanDesk>>,
}

/// Pools an edge holds requests for because they have no replica (scaled
/// to zero); the stream sends them to the control plane as soon as they
/// are signalled, which wakes the autoscaler for them.
#[derive(Debug, Default)]
pub struct DemandBoard {
    pools: std::sync::Mutex<std::collections::BTreeSet<String>>,
    signalled: tokio::sync::Notify,
}

impl DemandBoard {
    /// A request waits for `pool`.
    pub fn signal(&self, pool: &str) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if pools.insert(pool.to_string()) {
            self.signalled.notify_one();
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pools.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }
}

impl std::fmt::Debug for dyn QuotaExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaExchange")
    }
}

/// What a running subscription shows its owner.
#[derive(Debug, Clone)]
pub struct Subscription<T> {
    /// The last applied table; `None` until the first one.
    pub tables: watch::Receiver<Option<Arc<Applied<T>>>>,
    /// Whether a stream to a control plane is open now.
    pub connected: watch::Receiver<bool>,
    /// How the applied table compares with what the control plane offered.
    pub sync: Arc<SyncState>,
}

/// How far the applied table is behind the control plane's: the newest
/// version offered, how long a newer version than the applied one has been
/// waiting, and the refusals. A subscriber that refuses every push (or
/// never gets one applied) shows a growing lag even though it serves.
#[derive(Debug, Default)]
pub struct SyncState {
    inner: std::sync::Mutex<SyncInner>,
}

#[derive(Debug, Default)]
struct SyncInner {
    offered: u64,
    applied: u64,
    behind_since: Option<tokio::time::Instant>,
    refusals: u64,
    last_refusal: Option<(u64, String)>,
}

impl SyncState {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The control plane offered `version`.
    fn offered(&self, version: u64) {
        let mut inner = self.lock();
        inner.offered = inner.offered.max(version);
        if inner.offered > inner.applied && inner.behind_since.is_none() {
            inner.behind_since = Some(tokio::time::Instant::now());
        }
    }

    /// `version` is now the applied table.
    fn applied(&self, version: u64) {
        let mut inner = self.lock();
        inner.applied = version;
        if inner.applied >= inner.offered {
            inner.behind_since = None;
        }
    }

    /// `version` was refused for `reason`.
    fn refused(&self, version: u64, reason: &str) {
        let mut inner = self.lock();
        inner.refusals += 1;
        inner.last_refusal = Some((version, reason.to_string()));
    }

    /// How long a version newer than the applied one has been offered
    /// and not applied; zero when the applied table is the newest offered.
    pub fn lag(&self) -> Duration {
        self.lock()
            .behind_since
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// The newest version any control plane offered.
    pub fn offered_version(&self) -> u64 {
        self.lock().offered
    }

    /// How many pushed tables were refused since start.
    pub fn refusals(&self) -> u64 {
        self.lock().refusals
    }

    /// The last refused version and why.
    pub fn last_refusal(&self) -> Option<(u64, String)> {
        self.lock().last_refusal.clone()
    }
}

/// Starts the subscription task; it stops when `cancel` fires.
pub fn subscribe<A: ApplyTable>(
    config: DiscoveryConfig,
    applier: A,
    cancel: CancellationToken,
) -> (Subscription<A::Table>, JoinHandle<()>) {
    subscribe_from(config, applier, None, cancel)
}

/// Like `subscribe`, starting from `initial` (e.g. the last table saved to
/// disk) until the first push replaces it; the first push is accepted
/// whatever its version, since the control plane's state is the truth.
pub fn subscribe_from<A: ApplyTable>(
    config: DiscoveryConfig,
    applier: A,
    initial: Option<Applied<A::Table>>,
    cancel: CancellationToken,
) -> (Subscription<A::Table>, JoinHandle<()>) {
    let (tables_tx, tables) = watch::channel(initial.map(Arc::new));
    let (connected_tx, connected) = watch::channel(false);
    let sync = Arc::new(SyncState::default());
    let task = tokio::spawn(run(
        config,
        applier,
        tables_tx,
        connected_tx,
        sync.clone(),
        cancel,
    ));
    (
        Subscription {
            tables,
            connected,
            sync,
        },
        task,
    )
}

struct Session<'a, A: ApplyTable> {
    applier: &'a mut A,
    tables: &'a watch::Sender<Option<Arc<Applied<A::Table>>>>,
    sync: &'a SyncState,
    held: u64,
    received_any: bool,
    /// The table this stream sent last, which its deltas apply to.
    last: Option<RoutingTable>,
}

async fn run<A: ApplyTable>(
    mut config: DiscoveryConfig,
    mut applier: A,
    tables: watch::Sender<Option<Arc<Applied<A::Table>>>>,
    connected: watch::Sender<bool>,
    sync: Arc<SyncState>,
    cancel: CancellationToken,
) {
    if config.control_planes.is_empty() {
        tracing::error!("no control-plane address: discovery disabled");
        return;
    }
    let mut next = 0usize;
    let mut held = 0u64;
    loop {
        let address = config
            .client
            .uri(&config.control_planes[next % config.control_planes.len()]);
        next = next.wrapping_add(1);
        let mut session = Session {
            applier: &mut applier,
            tables: &tables,
            sync: &sync,
            held,
            received_any: false,
            last: None,
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = session.run(&address, &config, &connected) => outcome,
        };
        held = session.held;
        let _ = connected.send(false);
        if session.received_any {
            config.backoff.reset();
        }
        match outcome {
            Ok(()) => tracing::info!(%address, "control plane closed the routing-table stream"),
            Err(error) => tracing::warn!(%address, %error, "routing-table stream failed"),
        }
        let delay = config.backoff.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

impl<A: ApplyTable> Session<'_, A> {
    async fn run(
        &mut self,
        address: &str,
        config: &DiscoveryConfig,
        connected: &watch::Sender<bool>,
    ) -> Result<(), tonic::Status> {
        let channel = config
            .client
            .connect(address, config.connect_timeout)
            .await?;
        let mut client = DiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let hello = Hello {
            role: config.identity.role as i32,
            region: config.identity.region.clone(),
            node_id: config.identity.node_id.clone(),
            version_held: self.held,
            accepts_deltas: true,
        };
        send(&tx, subscribe_request::Kind::Hello(hello)).await?;
        let mut inbound = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let _ = connected.send(true);
        tracing::info!(%address, version_held = self.held, "subscribed to routing tables");
        if let Some(quota) = &config.quota {
            quota.stream_opened();
        }
        if let Some(loans) = &config.loans {
            loans.opened();
        }
        let result = self.follow(&mut inbound, &tx, config).await;
        if let Some(loans) = &config.loans {
            loans.closed();
        }
        if let Some(quota) = &config.quota {
            quota.stream_closed();
        }
        result
    }

    async fn follow(
        &mut self,
        inbound: &mut tonic::Streaming<infermesh_proto::v1::SubscribeResponse>,
        tx: &mpsc::Sender<SubscribeRequest>,
        config: &DiscoveryConfig,
    ) -> Result<(), tonic::Status> {
        let mut usage_tick = tokio::time::interval(config.usage_interval);
        usage_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let response = tokio::select! {
                response = inbound.message() => match response? {
                    Some(response) => response,
                    None => return Ok(()),
                },
                _ = async { config.demand.as_ref()?.signalled.notified().await; Some(()) }, if config.demand.is_some() => {
                    let pools = config.demand.as_ref().map(|d| d.take()).unwrap_or_default();
                    if !pools.is_empty() {
                        send(tx, subscribe_request::Kind::Demand(infermesh_proto::v1::Demand { pools })).await?;
                    }
                    continue;
                }
                _ = async { config.loans.as_ref()?.signalled.notified().await; Some(()) }, if config.loans.is_some() => {
                    for borrow in config.loans.as_ref().map(|l| l.take()).unwrap_or_default() {
                        send(tx, subscribe_request::Kind::Borrow(borrow)).await?;
                    }
                    continue;
                }
                _ = usage_tick.tick(), if config.quota.is_some() => {
                    if let Some(report) = config.quota.as_ref().and_then(|q| q.usage()) {
                        send(tx, subscribe_request::Kind::Usage(report)).await?;
                    }
                    continue;
                }
            };
            if let (Some(grants), Some(quota)) = (response.quotas, &config.quota) {
                quota.grants(grants);
            }
            if let (Some(loan), Some(loans)) = (response.loan, &config.loans) {
                loans.answer(loan);
            }
            if let Some(query) = response.explain {
                let answer = self.explain(&query, &config.identity.node_id);
                send(tx, subscribe_request::Kind::Explained(answer)).await?;
            }
            let table = match (response.table, response.delta) {
                (Some(table), _) => table,
                (None, Some(delta)) => {
                    // A change that does not fit what this stream sent
                    // cannot be repaired here: a new stream starts from a
                    // full table.
                    let base = self.last.as_ref().ok_or_else(|| {
                        tonic::Status::data_loss("a table change came before any table")
                    })?;
                    table_delta::apply(base, delta)
                        .map_err(|e| tonic::Status::data_loss(e.to_string()))?
                }
                (None, None) => continue,
            };
            self.last = Some(table.clone());
            self.received_any = true;
            let version = table.version;
            self.sync.offered(version);
            if version <= self.held {
                send(tx, subscribe_request::Kind::Ack(Ack { version })).await?;
                continue;
            }
            match self.applier.apply(table).map_err(|e| e.to_string()) {
                Ok(applied) => {
                    self.held = version;
                    self.sync.applied(version);
                    self.tables.send_replace(Some(Arc::new(Applied {
                        version,
                        table: applied,
                    })));
                    tracing::debug!(version, "routing table applied");
                    send(tx, subscribe_request::Kind::Ack(Ack { version })).await?;
                }
                Err(reason) => {
                    self.sync.refused(version, &reason);
                    tracing::warn!(version, %reason, "routing table refused; keeping version {}", self.held);
                    send(tx, subscribe_request::Kind::Nack(Nack { version, reason })).await?;
                }
            }
        }
    }
}

impl<A: ApplyTable> Session<'_, A> {
    /// The answer to `query` from the table applied last.
    fn explain(&self, query: &ExplainQuery, node_id: &str) -> ExplainAnswer {
        let applied = self.tables.borrow().clone();
        let explained = match &applied {
            Some(applied) => self.applier.explain(&applied.table, query),
            None => Err("no routing table applied yet".to_string()),
        };
        match explained {
            Ok(mut explanation) => {
                explanation.edge = node_id.to_string();
                explanation.table_version = applied.map_or(0, |a| a.version);
                ExplainAnswer {
                    id: query.id,
                    explanation: Some(explanation),
                    error: String::new(),
                }
            }
            Err(error) => ExplainAnswer {
                id: query.id,
                explanation: None,
                error,
            },
        }
    }
}

async fn send(
    tx: &mpsc::Sender<SubscribeRequest>,
    kind: subscribe_request::Kind,
) -> Result<(), tonic::Status> {
    tx.send(SubscribeRequest { kind: Some(kind) })
        .await
        .map_err(|_| tonic::Status::cancelled("routing-table stream closed"))
}
