//! LoadReportService: a sidecar's registration and load. The endpoint key
//! is bound to this control-plane replica's lease (`replica_lease`); when
//! the stream ends the key is deleted and the endpoint leaves every table
//! at once. When the control plane itself stops, keys are left to expire
//! with its lease, so a rolling restart does not pull every replica out of
//! the tables: sidecars re-register with another replica first.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::{
    Endpoint, EndpointState, EngineKind, Load, LoadReportRequest, LoadReportResponse, Register,
    Registered, load_report_request, load_report_response,
    load_report_service_server::LoadReportService,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{first_message, now_unix_ms};
use crate::auth::Authorizer;
use crate::loads::LoadBook;
use crate::metrics::ControlPlaneMetrics;
use crate::registry::{RegistryError, validate};
use crate::replica_lease::ReplicaLease;
use crate::store::Store;
use infermesh_runtime::tls::peer_identity;

/// Lease and reporting settings handed to every sidecar.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// Seconds an endpoint outlives its stream.
    pub ttl_seconds: u32,
    /// How often sidecars report.
    pub report_interval: Duration,
}

/// The load-report service.
pub struct LoadReports {
    store: Store,
    lease: ReplicaLease,
    loads: Arc<LoadBook>,
    settings: LeaseSettings,
    auth: Arc<Authorizer>,
    metrics: Arc<ControlPlaneMetrics>,
    cancel: CancellationToken,
}

impl LoadReports {
    /// A load-report service writing endpoints to `store`.
    pub fn new(
        store: Store,
        lease: ReplicaLease,
        loads: Arc<LoadBook>,
        settings: LeaseSettings,
        auth: Arc<Authorizer>,
        metrics: Arc<ControlPlaneMetrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
            lease,
            loads,
            settings,
            auth,
            metrics,
            cancel,
        }
    }
}

fn endpoint_from(register: Register) -> Result<Endpoint, RegistryError> {
    validate::endpoint_id("register.endpoint_id", &register.endpoint_id)?;
    validate::dns_label("register.pool", &register.pool)?;
    validate::model_name("register.model", &register.model)?;
    validate::dns_label("register.region", &register.region)?;
    if !register.zone.is_empty() {
        validate::dns_label("register.zone", &register.zone)?;
    }
    validate::host_port("register.address", &register.address)?;
    if register.fingerprint.len() > 128
        || !register
            .fingerprint
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(RegistryError::invalid(
            "register.fingerprint",
            "at most 128 letters, digits, '-', '_', '.' or ':'",
        ));
    }
    if !matches!(
        EngineKind::try_from(register.engine),
        Ok(EngineKind::Vllm | EngineKind::Sglang)
    ) {
        return Err(RegistryError::invalid(
            "register.engine",
            "must be VLLM or SGLANG",
        ));
    }
    Ok(Endpoint {
        id: register.endpoint_id,
        pool: register.pool,
        model: register.model,
        region: register.region,
        zone: register.zone,
        address: register.address,
        engine: register.engine,
        state: EndpointState::Serving as i32,
        load: None,
        registered_at_unix_ms: now_unix_ms(),
        fingerprint: register.fingerprint,
    })
}

type DirectiveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<LoadReportResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoadReportService for LoadReports {
    type ReportStream = DirectiveStream;

    async fn report(
        &self,
        request: Request<Streaming<LoadReportRequest>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let peer = peer_identity(&request);
        let presented = Authorizer::presented(&request);
        let remote = request.remote_addr().map(|a| a.ip());
        if let Err(status) = self.auth.reporter(peer.as_ref()) {
            tracing::warn!(peer = ?peer.as_ref().map(|p| p.uri()), reason = %status.message(), "load reporter refused");
            return Err(status);
        }
        if let Err(status) = self.auth.not_revoked(presented.as_ref()) {
            tracing::warn!(peer = ?peer.as_ref().map(|p| p.uri()), reason = %status.message(), "load reporter refused");
            return Err(status);
        }
        let revoked = Box::pin(self.auth.until_revoked(presented));
        let mut inbound = request.into_inner();
        let register = match first_message(&mut inbound, "register").await?.kind {
            Some(load_report_request::Kind::Register(register)) => register,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be register",
                ));
            }
        };
        if let Err(status) = self.auth.registration(peer.as_ref(), &register, remote) {
            tracing::warn!(peer = ?peer.as_ref().map(|p| p.uri()), endpoint = %register.endpoint_id, reason = %status.message(), "registration refused");
            self.metrics.registration_refused(status.code());
            return Err(status);
        }
        let endpoint = endpoint_from(register)?;
        let ttl = i64::from(self.settings.ttl_seconds.max(1));
        let mut leases = self.lease.current.clone();
        let lease = match tokio::time::timeout(
            Duration::from_secs(5),
            leases.wait_for(|l| l.is_some()),
        )
        .await
        {
            Ok(Ok(lease)) => lease.unwrap_or_default(),
            _ => {
                return Err(Status::unavailable(
                    "this control-plane replica holds no etcd lease (is etcd reachable?); retry",
                ));
            }
        };
        if let Err(error) = self.store.put_endpoint(&endpoint, lease).await {
            if crate::replica_lease::lease_missing(&error) {
                self.lease.report_missing(lease);
            }
            return Err(RegistryError::from(error).into());
        }
        tracing::info!(endpoint = %endpoint.id, pool = %endpoint.pool, address = %endpoint.address, lease, "endpoint registered");
        let (tx, rx) = mpsc::channel(4);
        let registered = LoadReportResponse {
            kind: Some(load_report_response::Kind::Registered(Registered {
                lease_ttl_seconds: ttl as u32,
                report_interval_ms: self.settings.report_interval.as_millis() as u32,
            })),
        };
        let _ = tx.send(Ok(registered)).await;
        let session = Session {
            store: self.store.clone(),
            loads: self.loads.clone(),
            metrics: self.metrics.clone(),
            endpoint,
            lease,
            tx,
        };
        tokio::spawn(session.run(inbound, leases, revoked, self.cancel.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    store: Store,
    loads: Arc<LoadBook>,
    metrics: Arc<ControlPlaneMetrics>,
    endpoint: Endpoint,
    lease: i64,
    tx: mpsc::Sender<Result<LoadReportResponse, Status>>,
}

/// How a session ended.
enum End {
    /// The sidecar went away: the endpoint must leave now.
    SidecarGone,
    /// The control plane is stopping: leave the lease to expire.
    Shutdown,
    /// The lease could not be kept: tell the sidecar to register again.
    LeaseLost(String),
    /// The sidecar's certificate was revoked: remove the endpoint, end the stream.
    Revoked(Status),
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<LoadReportRequest>,
        mut leases: watch::Receiver<Option<i64>>,
        mut revoked: std::pin::Pin<Box<dyn std::future::Future<Output = Status> + Send>>,
        cancel: CancellationToken,
    ) {
        let end = loop {
            tokio::select! {
                _ = cancel.cancelled() => break End::Shutdown,
                status = &mut revoked => break End::Revoked(status),
                _ = self.tx.closed() => break End::SidecarGone,
                changed = leases.changed() => {
                    if changed.is_err() {
                        break End::Shutdown;
                    }
                    if *leases.borrow_and_update() != Some(self.lease) {
                        break End::LeaseLost("the control-plane replica's lease was lost".into());
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Err(e) = self.handle(message).await {
                            break End::LeaseLost(e.to_string());
                        }
                    }
                    Ok(None) | Err(_) => break End::SidecarGone,
                },
            }
        };
        let id = &self.endpoint.id;
        match end {
            End::Shutdown => {
                tracing::info!(endpoint = %id, "leaving endpoint lease to expire: control plane stopping")
            }
            End::SidecarGone => {
                tracing::info!(endpoint = %id, "sidecar stream ended; removing endpoint");
                self.loads.remove(id);
                // Only while the key is still this replica's: the sidecar
                // may have re-registered with another replica meanwhile.
                if let Err(error) = self.store.delete_endpoint(id, self.lease).await {
                    tracing::warn!(endpoint = %id, %error, "endpoint not deleted; it expires with this replica's lease");
                }
            }
            End::Revoked(status) => {
                tracing::warn!(endpoint = %id, reason = %status.message(), "closing the stream of a revoked identity; removing endpoint");
                self.loads.remove(id);
                if let Err(error) = self.store.delete_endpoint(id, self.lease).await {
                    tracing::warn!(endpoint = %id, %error, "endpoint not deleted; it expires with this replica's lease");
                }
                let _ = self.tx.send(Err(status)).await;
            }
            End::LeaseLost(reason) => {
                tracing::warn!(endpoint = %id, %reason, "endpoint lease lost; asking the sidecar to register again");
                let _ = self
                    .tx
                    .send(Err(Status::unavailable(format!(
                        "endpoint lease lost: {reason}"
                    ))))
                    .await;
            }
        }
    }

    async fn handle(&mut self, message: LoadReportRequest) -> Result<(), crate::store::StoreError> {
        match message.kind {
            Some(load_report_request::Kind::Load(load)) => {
                let state = self.state_for(&load);
                self.metrics.load_report();
                self.loads.insert(self.endpoint.id.clone(), load);
                self.set_state(state).await
            }
            Some(load_report_request::Kind::Draining(_)) => {
                self.set_state(EndpointState::Draining).await
            }
            Some(load_report_request::Kind::Register(_)) | None => Ok(()),
        }
    }

    /// Health follows the engine's probe, except that draining is final.
    fn state_for(&self, load: &Load) -> EndpointState {
        match EndpointState::try_from(self.endpoint.state) {
            Ok(EndpointState::Draining) => EndpointState::Draining,
            _ if load.engine_healthy => EndpointState::Serving,
            _ => EndpointState::Unhealthy,
        }
    }

    /// Writes the endpoint only when its state changes, not on every report.
    async fn set_state(&mut self, state: EndpointState) -> Result<(), crate::store::StoreError> {
        if self.endpoint.state == state as i32 {
            return Ok(());
        }
        tracing::info!(endpoint = %self.endpoint.id, ?state, "endpoint state changed");
        self.endpoint.state = state as i32;
        self.store.put_endpoint(&self.endpoint, self.lease).await
    }
}
