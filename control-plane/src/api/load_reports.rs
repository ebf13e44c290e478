//! LoadReportService: a sidecar's registration and load. The endpoint key
//! lives under an etcd lease this stream keeps alive; when the stream ends
//! the lease is revoked and the endpoint leaves every table at once. When
//! the control plane itself stops, leases are left to expire, so a rolling
//! restart does not pull every replica out of the tables.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use infermesh_proto::v1::{
    Endpoint, EndpointState, EngineKind, Load, LoadReportRequest, LoadReportResponse, Register,
    Registered, load_report_request, load_report_response,
    load_report_service_server::LoadReportService,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::admin::LoadBook;
use super::{first_message, now_unix_ms};
use crate::auth::Authorizer;
use crate::metrics::ControlPlaneMetrics;
use crate::registry::{RegistryError, validate};
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
        loads: Arc<LoadBook>,
        settings: LeaseSettings,
        auth: Arc<Authorizer>,
        metrics: Arc<ControlPlaneMetrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
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
        if let Err(status) = self.auth.reporter(peer.as_ref()) {
            tracing::warn!(peer = ?peer.as_ref().map(|p| p.uri()), reason = %status.message(), "load reporter refused");
            return Err(status);
        }
        let mut inbound = request.into_inner();
        let register = match first_message(&mut inbound, "register").await?.kind {
            Some(load_report_request::Kind::Register(register)) => register,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be register",
                ));
            }
        };
        let endpoint = endpoint_from(register)?;
        let ttl = i64::from(self.settings.ttl_seconds.max(1));
        let lease = self
            .store
            .grant_lease(ttl)
            .await
            .map_err(RegistryError::from)?;
        self.store
            .put_endpoint(&endpoint, lease)
            .await
            .map_err(RegistryError::from)?;
        let (keeper, keep_alive_responses) = self
            .store
            .keep_alive(lease)
            .await
            .map_err(RegistryError::from)?;
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
            ttl: Duration::from_secs(ttl as u64),
            tx,
        };
        tokio::spawn(session.run(inbound, keeper, keep_alive_responses, self.cancel.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    store: Store,
    loads: Arc<LoadBook>,
    metrics: Arc<ControlPlaneMetrics>,
    endpoint: Endpoint,
    lease: i64,
    ttl: Duration,
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
}

impl Session {
    /// A new keep-alive stream for the lease (on whichever etcd member
    /// answers), tried for a third of the TTL; `None` when none could be opened.
    async fn reopen_keep_alive(
        &self,
    ) -> Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> {
        let deadline = tokio::time::Instant::now() + self.ttl / 3;
        while tokio::time::Instant::now() < deadline {
            if let Ok((mut keeper, responses)) = self.store.keep_alive(self.lease).await
                && keeper.keep_alive().await.is_ok()
            {
                tracing::info!(endpoint = %self.endpoint.id, "lease keep-alive reopened");
                return Some((keeper, responses));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    async fn run(
        mut self,
        mut inbound: Streaming<LoadReportRequest>,
        mut keeper: etcd_client::LeaseKeeper,
        mut keep_alive_responses: etcd_client::LeaseKeepAliveStream,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        let end = loop {
            tokio::select! {
                _ = cancel.cancelled() => break End::Shutdown,
                _ = self.tx.closed() => break End::SidecarGone,
                _ = tick.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        // The etcd member the stream went to may be down: reopen it elsewhere.
                        match self.reopen_keep_alive().await {
                            Some((k, r)) => (keeper, keep_alive_responses) = (k, r),
                            None => break End::LeaseLost(e.to_string()),
                        }
                    }
                }
                response = keep_alive_responses.next() => match response {
                    Some(Ok(r)) if r.ttl() > 0 => {}
                    Some(Ok(_)) => break End::LeaseLost("lease expired".into()),
                    Some(Err(e)) => match self.reopen_keep_alive().await {
                        Some((k, r)) => (keeper, keep_alive_responses) = (k, r),
                        None => break End::LeaseLost(e.to_string()),
                    },
                    None => match self.reopen_keep_alive().await {
                        Some((k, r)) => (keeper, keep_alive_responses) = (k, r),
                        None => break End::LeaseLost("keep-alive stream ended".into()),
                    },
                },
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
                if let Err(error) = self.store.revoke_lease(self.lease).await {
                    tracing::warn!(endpoint = %id, %error, "lease revoke failed; endpoint expires with its lease");
                }
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
