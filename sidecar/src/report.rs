//! The load-report stream: registers the replica, then sends the latest
//! load at the interval the control plane asks for, and `Draining` once the
//! pod is stopping. Follows directives (drain, interval). Reconnects with
//! jittered backoff across control-plane addresses; while it is away the
//! proxy keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use infermesh_proto::v1::{
    Draining, Load, LoadReportRequest, Register, load_report_request, load_report_response,
    load_report_service_client::LoadReportServiceClient,
};
use infermesh_runtime::backoff::Backoff;
use infermesh_runtime::control_plane::ControlPlaneClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Where and as what to report.
#[derive(Debug, Clone)]
pub struct Reporter {
    /// Control-plane addresses, tried in turn.
    pub control_planes: Vec<String>,
    /// How to connect to them.
    pub client: ControlPlaneClient,
    /// The registration sent first on every stream.
    pub register: Register,
    /// Interval used until the control plane names one.
    pub default_interval: Duration,
}

/// What a stream tells the rest of the sidecar.
struct Signals {
    registered: watch::Sender<bool>,
    drain_requested: CancellationToken,
    last_sent: Arc<AtomicI64>,
}

/// What the reporter shows the rest of the sidecar.
#[derive(Debug, Clone)]
pub struct ReportStatus {
    /// True while a stream is registered.
    pub registered: watch::Receiver<bool>,
    /// Fires when the control plane tells the replica to drain.
    pub drain_requested: CancellationToken,
    /// When the last load report was handed to the stream, Unix ms (0: never).
    pub last_sent_unix_ms: Arc<AtomicI64>,
}

impl Reporter {
    /// Starts reporting `loads`; `draining` turns true when the pod stops.
    pub fn spawn(
        self,
        loads: watch::Receiver<Load>,
        draining: watch::Receiver<bool>,
        cancel: CancellationToken,
    ) -> (ReportStatus, tokio::task::JoinHandle<()>) {
        let (registered_tx, registered) = watch::channel(false);
        let drain_requested = CancellationToken::new();
        let last_sent = Arc::new(AtomicI64::new(0));
        let status = ReportStatus {
            registered,
            drain_requested: drain_requested.clone(),
            last_sent_unix_ms: last_sent.clone(),
        };
        let task = tokio::spawn(self.run(
            loads,
            draining,
            registered_tx,
            drain_requested,
            last_sent,
            cancel,
        ));
        (status, task)
    }

    async fn run(
        self,
        mut loads: watch::Receiver<Load>,
        mut draining: watch::Receiver<bool>,
        registered: watch::Sender<bool>,
        drain_requested: CancellationToken,
        last_sent: Arc<AtomicI64>,
        cancel: CancellationToken,
    ) {
        let signals = Signals {
            registered,
            drain_requested,
            last_sent,
        };
        let mut backoff = Backoff::default();
        let mut next = 0usize;
        loop {
            let address = self
                .client
                .uri(&self.control_planes[next % self.control_planes.len().max(1)]);
            next = next.wrapping_add(1);
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.session(&address, &mut loads, &mut draining, &signals, &mut backoff) => outcome,
            };
            signals.registered.send_replace(false);
            if let Err(status) = outcome {
                tracing::warn!(%address, %status, "load-report stream failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn session(
        &self,
        address: &str,
        loads: &mut watch::Receiver<Load>,
        draining: &mut watch::Receiver<bool>,
        signals: &Signals,
        backoff: &mut Backoff,
    ) -> Result<(), Status> {
        let channel = self.client.connect(address, Duration::from_secs(3)).await?;
        let (tx, rx) = mpsc::channel(8);
        let send = |kind| {
            let tx = tx.clone();
            async move {
                tx.send(LoadReportRequest { kind: Some(kind) })
                    .await
                    .map_err(|_| Status::cancelled("load-report stream closed"))
            }
        };
        send(load_report_request::Kind::Register(self.register.clone())).await?;
        let mut inbound = LoadReportServiceClient::new(channel)
            .report(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut interval = self.default_interval;
        match inbound.message().await? {
            Some(message) => match message.kind {
                Some(load_report_response::Kind::Registered(r)) => {
                    if r.report_interval_ms > 0 {
                        interval = Duration::from_millis(u64::from(r.report_interval_ms));
                    }
                    tracing::info!(%address, endpoint = %self.register.endpoint_id, lease_ttl_s = r.lease_ttl_seconds, ?interval, "registered with the control plane");
                }
                _ => {
                    return Err(Status::internal(
                        "control plane did not confirm the registration",
                    ));
                }
            },
            None => {
                return Err(Status::unavailable(
                    "stream closed before registration was confirmed",
                ));
            }
        }
        signals.registered.send_replace(true);
        backoff.reset();
        if *draining.borrow_and_update() {
            send(load_report_request::Kind::Draining(Draining {})).await?;
        }
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let load = loads.borrow_and_update().clone();
                    send(load_report_request::Kind::Load(load)).await?;
                    signals.last_sent.store(infermesh_runtime::time::now_unix_ms(), Ordering::Relaxed);
                }
                changed = draining.changed() => {
                    if changed.is_ok() && *draining.borrow_and_update() {
                        send(load_report_request::Kind::Draining(Draining {})).await?;
                    }
                }
                message = inbound.message() => match message?.and_then(|m| m.kind) {
                    Some(load_report_response::Kind::Drain(drain)) => {
                        tracing::info!(reason = %drain.reason, "control plane asked this replica to drain");
                        signals.drain_requested.cancel();
                    }
                    Some(load_report_response::Kind::SetReportInterval(s)) if s.report_interval_ms > 0 => {
                        interval = Duration::from_millis(u64::from(s.report_interval_ms));
                        tick = tokio::time::interval(interval);
                        tracing::info!(?interval, "report interval changed");
                    }
                    Some(_) => {}
                    None => return Ok(()),
                },
            }
        }
    }
}
