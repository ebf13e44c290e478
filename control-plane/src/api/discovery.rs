//! DiscoveryService: one stream per subscriber. Sends the table for the
//! subscriber's role and region whenever the watched snapshot changes it
//! (after the first table, only what changed, to subscribers that apply
//! changes), skips pushes whose content did not change, and records ACKs
//! and NACKs.
//! It never pushes from an unsynced snapshot: an empty table would make
//! every edge drop its routes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use infermesh_proto::v1::{
    Hello, RoutingTable, SubscribeRequest, SubscribeResponse, SubscriberRole, TableDelta,
    discovery_service_server::DiscoveryService, subscribe_request,
};
use infermesh_runtime::table_delta;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{first_message, now_unix_ms};
use crate::auth::Authorizer;
use crate::autoscale::DemandBook;
use crate::fleet::{ExplainDesk, StreamId, Subscriber, SubscriberBook, SubscriberState};
use crate::metrics::{ControlPlaneMetrics, PushKind};
use crate::quota::{QuotaBook, SessionId};
use crate::registry::validate;
use crate::snapshot::Snapshot;
use crate::tables;
use infermesh_runtime::tls::peer_identity;

/// Loans lent on one stream and not yet sent.
const LOANS_QUEUED: usize = 256;

/// The discovery service.
pub struct Discovery {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    subscribers: Arc<SubscriberBook>,
    quotas: Arc<QuotaBook>,
    auth: Arc<Authorizer>,
    metrics: Arc<ControlPlaneMetrics>,
    edge_tables: Arc<EdgeTables>,
    demand: Arc<DemandBook>,
    explain: Arc<ExplainDesk>,
    cancel: CancellationToken,
}

impl Discovery {
    /// A discovery service pushing tables built from `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        subscribers: Arc<SubscriberBook>,
        quotas: Arc<QuotaBook>,
        auth: Arc<Authorizer>,
        metrics: Arc<ControlPlaneMetrics>,
        demand: Arc<DemandBook>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            subscribers,
            quotas,
            auth,
            metrics,
            edge_tables: Arc::default(),
            demand,
            explain: Arc::default(),
            cancel,
        }
    }

    /// Sends ExplainRoute's questions to edges through `desk`.
    pub fn explaining_through(mut self, desk: Arc<ExplainDesk>) -> Self {
        self.explain = desk;
        self
    }
}

type TableStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

fn check_hello(hello: &Hello) -> Result<SubscriberRole, Status> {
    let role = match SubscriberRole::try_from(hello.role) {
        Ok(role @ (SubscriberRole::Edge | SubscriberRole::Sidecar)) => role,
        _ => {
            return Err(Status::invalid_argument(
                "hello.role: must be EDGE or SIDECAR",
            ));
        }
    };
    validate::dns_label("hello.region", &hello.region).map_err(Status::from)?;
    if hello.node_id.is_empty() || hello.node_id.len() > 253 {
        return Err(Status::invalid_argument(
            "hello.node_id: must be 1 to 253 characters",
        ));
    }
    Ok(role)
}

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    type SubscribeStream = TableStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = peer_identity(&request);
        let remote_address = request.remote_addr();
        let presented = Authorizer::presented(&request);
        let mut inbound = request.into_inner();
        let hello = match first_message(&mut inbound, "hello").await?.kind {
            Some(subscribe_request::Kind::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("the first message must be hello")),
        };
        let role = check_hello(&hello)?;
        if let Err(status) = self.auth.subscriber(peer.as_ref(), role, &hello.region) {
            tracing::warn!(node = %hello.node_id, ?role, region = %hello.region, peer = ?peer.as_ref().map(|p| p.uri()), reason = %status.message(), "subscriber refused");
            return Err(status);
        }
        if let Err(status) = self.auth.not_revoked(presented.as_ref()) {
            tracing::warn!(node = %hello.node_id, reason = %status.message(), "subscriber refused");
            return Err(status);
        }
        let revoked = Box::pin(self.auth.until_revoked(presented));
        let (tx, rx) = mpsc::channel(4);
        let subscriber = Subscriber {
            role,
            region: hello.region.clone(),
            node_id: hello.node_id.clone(),
            identity: peer.as_ref().map(|p| p.to_string()),
            remote_address,
        };
        let session = Session {
            role,
            subscriber,
            hello,
            snapshots: self.snapshots.clone(),
            subscribers: self.subscribers.clone(),
            quotas: self.quotas.clone(),
            metrics: self.metrics.clone(),
            edge_tables: self.edge_tables.clone(),
            demand: self.demand.clone(),
            explain: self.explain.clone(),
            tx,
        };
        tokio::spawn(session.run(inbound, revoked, self.cancel.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    role: SubscriberRole,
    subscriber: Subscriber,
    hello: Hello,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    subscribers: Arc<SubscriberBook>,
    quotas: Arc<QuotaBook>,
    metrics: Arc<ControlPlaneMetrics>,
    edge_tables: Arc<EdgeTables>,
    demand: Arc<DemandBook>,
    explain: Arc<ExplainDesk>,
    tx: mpsc::Sender<Result<SubscribeResponse, Status>>,
}

/// Edge tables by region for the latest snapshot, with their content
/// encoding, built on first demand and shared by every edge session; and
/// the changes to them from earlier tables, each made once for all the
/// sessions that sent the same earlier table.
#[derive(Default)]
pub struct EdgeTables {
    built: std::sync::Mutex<Built>,
}

#[derive(Default)]
struct Built {
    revision: i64,
    tables: HashMap<String, SharedTable>,
    /// By region and the version the change starts from.
    deltas: HashMap<(String, u64), SharedDelta>,
}

type SharedTable = (Arc<RoutingTable>, Arc<Vec<u8>>);

/// A change with its encoded size.
type SharedDelta = (Arc<TableDelta>, usize);

impl EdgeTables {
    fn get(&self, snapshot: &Snapshot, region: &str) -> SharedTable {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if built.revision != snapshot.revision {
            *built = Built {
                revision: snapshot.revision,
                ..Built::default()
            };
        }
        built
            .tables
            .entry(region.to_string())
            .or_insert_with(|| {
                let table = tables::build(snapshot, SubscriberRole::Edge, region, "");
                let body = Arc::new(content(&table));
                (Arc::new(table), body)
            })
            .clone()
    }

    /// The change from `from` to `to`, the region's current table.
    fn delta(&self, region: &str, from: &RoutingTable, to: &RoutingTable) -> SharedDelta {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let current = built
            .tables
            .get(region)
            .is_some_and(|(table, _)| table.version == to.version);
        if !current {
            // The snapshot moved on meanwhile: nobody else needs this one.
            return delta(from, to);
        }
        built
            .deltas
            .entry((region.to_string(), from.version))
            .or_insert_with(|| delta(from, to))
            .clone()
    }
}

fn delta(from: &RoutingTable, to: &RoutingTable) -> SharedDelta {
    let delta = table_delta::diff(from, to);
    let size = delta.encoded_len();
    (Arc::new(delta), size)
}

/// The table's content without its version, to tell real changes from revision bumps elsewhere.
fn content(table: &RoutingTable) -> Vec<u8> {
    RoutingTable {
        version: 0,
        ..table.clone()
    }
    .encode_to_vec()
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<SubscribeRequest>,
        mut revoked: std::pin::Pin<Box<dyn std::future::Future<Output = Status> + Send>>,
        cancel: CancellationToken,
    ) {
        let node = self.hello.node_id.clone();
        let _counted = self.metrics.subscriber(self.role, &self.hello.region);
        tracing::info!(%node, role = ?self.role, region = %self.hello.region, held = self.hello.version_held, "subscriber connected");
        let stream = self.subscribers.open(SubscriberState::connected(
            self.subscriber.clone(),
            self.hello.version_held,
            now_unix_ms(),
        ));
        let mut held = self.hello.version_held;
        // The table this stream sent last, with its content encoding.
        let mut last_sent: Option<SharedTable> = None;
        // Only edges take part in rate limiting; a sidecar's receiver stays empty.
        let (quota_session, mut grants) = match self.role {
            SubscriberRole::Edge => {
                let (id, rx) = self.quotas.open();
                (Some(id), rx)
            }
            _ => (None, mpsc::channel(1).1),
        };
        let (loans_tx, mut loans_rx) = mpsc::channel(LOANS_QUEUED);
        // Only edges route requests, so only they are asked to explain.
        let mut questions = match self.role {
            SubscriberRole::Edge => self.explain.attach(stream, &self.hello.region, &node),
            _ => mpsc::channel(1).1,
        };
        loop {
            let snapshot = self.snapshots.borrow_and_update().clone();
            if snapshot.is_synced() {
                let (table, body) = match self.role {
                    // Every edge of a region gets the same table: built and
                    // encoded once per snapshot, shared by their sessions.
                    SubscriberRole::Edge => self.edge_tables.get(&snapshot, &self.hello.region),
                    _ => {
                        let table = tables::build(&snapshot, self.role, &self.hello.region, &node);
                        let body = Arc::new(content(&table));
                        (Arc::new(table), body)
                    }
                };
                let unchanged = last_sent.as_ref().is_some_and(|(_, sent)| *sent == body);
                if table.version > held && !unchanged {
                    let version = table.version;
                    let previous = last_sent.as_ref().map(|(sent, _)| &**sent);
                    let response = self.table_message(&table, body.len(), previous);
                    if self.tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                    held = version;
                    last_sent = Some((table, body));
                    self.subscribers
                        .update(stream, |state| state.offered(version, now_unix_ms()));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.tx.closed() => break,
                status = &mut revoked => {
                    tracing::warn!(%node, reason = %status.message(), "closing the stream of a revoked identity");
                    let _ = self.tx.send(Err(status)).await;
                    break;
                }
                changed = self.snapshots.changed() => if changed.is_err() { break },
                Some(quotas) = grants.recv() => {
                    // Grants only make sense against a table the edge holds.
                    if held > 0 {
                        let response = SubscribeResponse { quotas: Some(quotas), ..Default::default() };
                        if self.tx.send(Ok(response)).await.is_err() {
                            break;
                        }
                    }
                }
                Some(loan) = loans_rx.recv() => {
                    let response = SubscribeResponse { loan: Some(loan), ..Default::default() };
                    if self.tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                }
                Some(query) = questions.recv() => {
                    let response = SubscribeResponse { explain: Some(query), ..Default::default() };
                    if self.tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.record(&node, stream, quota_session, &loans_tx, message),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%node, %status, "subscriber stream failed");
                        break;
                    }
                },
            }
        }
        if let Some(id) = quota_session {
            self.quotas.close(id);
        }
        self.explain.detach(stream);
        self.subscribers.close(stream);
        tracing::info!(%node, "subscriber disconnected");
    }

    /// `table` whole, or what changed since `previous` (the table this
    /// stream sent last) when the subscriber applies changes and the change
    /// is the smaller message. `size` is the table's encoded size.
    fn table_message(
        &self,
        table: &Arc<RoutingTable>,
        size: usize,
        previous: Option<&RoutingTable>,
    ) -> SubscribeResponse {
        if let Some(previous) = previous.filter(|_| self.hello.accepts_deltas) {
            let (delta, delta_size) = match self.role {
                SubscriberRole::Edge => self.edge_tables.delta(&self.hello.region, previous, table),
                _ => delta(previous, table),
            };
            if delta_size < size {
                self.metrics.pushed(PushKind::Delta, delta_size);
                return SubscribeResponse {
                    delta: Some((*delta).clone()),
                    ..Default::default()
                };
            }
        }
        self.metrics.pushed(PushKind::Full, size);
        SubscribeResponse {
            table: Some((**table).clone()),
            ..Default::default()
        }
    }

    fn record(
        &self,
        node: &str,
        stream: StreamId,
        quota_session: Option<SessionId>,
        loans: &mpsc::Sender<infermesh_proto::v1::Loan>,
        message: SubscribeRequest,
    ) {
        if let Some(subscribe_request::Kind::Usage(report)) = message.kind {
            match quota_session {
                Some(id) => self.quotas.report(id, report),
                None => tracing::debug!(%node, "ignoring usage from a non-edge subscriber"),
            }
            return;
        }
        if let Some(subscribe_request::Kind::Demand(demand)) = message.kind {
            if self.role == SubscriberRole::Edge {
                let snapshot = self.snapshots.borrow().clone();
                self.demand
                    .note(&snapshot, &self.hello.region, demand.pools);
            } else {
                tracing::debug!(%node, "ignoring demand from a non-edge subscriber");
            }
            return;
        }
        if let Some(subscribe_request::Kind::Borrow(borrow)) = &message.kind {
            if quota_session.is_some() {
                // Lent now, sent by the session loop; past LOANS_QUEUED
                // answers waiting, one is dropped and its borrower refuses
                // as it would have without a reserve.
                if loans.try_send(self.quotas.lend(borrow)).is_err() {
                    tracing::debug!(%node, "too many loans waiting to be sent; one dropped");
                }
            } else {
                tracing::debug!(%node, "ignoring a borrow from a non-edge subscriber");
            }
            return;
        }
        if let Some(subscribe_request::Kind::Explained(answer)) = message.kind {
            if !self.explain.answered(stream, answer) {
                tracing::debug!(%node, "ignoring an answer to no question of this stream");
            }
            return;
        }
        match message.kind {
            Some(subscribe_request::Kind::Ack(ack)) => {
                let previous = self
                    .subscribers
                    .update(stream, |state| state.acked(ack.version, now_unix_ms()))
                    .flatten();
                if let Some(previous) = previous {
                    self.metrics.acked(self.role, previous, ack.version);
                }
            }
            Some(subscribe_request::Kind::Nack(nack)) => {
                tracing::warn!(%node, version = nack.version, reason = %nack.reason, "subscriber refused a routing table");
                self.metrics.nacked(self.role, &self.hello.region);
                self.subscribers.update(stream, |state| {
                    state.nacked(nack.version, &nack.reason, now_unix_ms())
                });
            }
            Some(
                subscribe_request::Kind::Hello(_)
                | subscribe_request::Kind::Usage(_)
                | subscribe_request::Kind::Demand(_)
                | subscribe_request::Kind::Explained(_)
                | subscribe_request::Kind::Borrow(_),
            )
            | None => {
                tracing::debug!(%node, "ignoring a repeated hello");
            }
        }
    }
}
