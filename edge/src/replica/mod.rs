//! One replica as the request path sees it: its address and identity, and
//! the live state kept across table pushes (requests in flight from this
//! edge, passive health, the load its sidecar last stamped).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use http::uri::Authority;

use crate::health::Health;

mod load;

pub use load::LoadSample;

/// One replica the edge may send to.
#[derive(Debug)]
pub struct Upstream {
    /// Endpoint id.
    pub id: String,
    /// Pool it belongs to.
    pub pool: String,
    /// Its sidecar's `host:port`.
    pub authority: Authority,
    /// The same address carrying the identity its certificate must name
    /// under mutual TLS (`tls::mesh::expected_authority`).
    pub mesh_authority: Option<Authority>,
    /// Requests this edge has in flight to it.
    pub in_flight: Arc<AtomicUsize>,
    /// Its passive health (ejection), kept across pushes.
    pub health: Arc<Health>,
    /// Its engine's latest load as the sidecar stamped it, kept across pushes.
    pub load: Arc<LoadSample>,
    /// Its engine fingerprint (what makes cached answers interchangeable).
    pub fingerprint: String,
    /// Requests its engine runs at once (its pool's), 0 when unknown.
    pub max_concurrency: u32,
}

impl Upstream {
    /// Whether it runs as many requests as its pool's bound allows; never
    /// without a bound. Its requests are this edge's in flight to it, plus
    /// what others had in flight when its sidecar last stamped a response
    /// to this edge; without the sidecar's count, the larger of this
    /// edge's and what its engine last stamped (running and waiting).
    pub fn at_bound(&self) -> bool {
        let bound = u64::from(self.max_concurrency);
        if bound == 0 {
            return false;
        }
        let mine = self.in_flight.load(std::sync::atomic::Ordering::Relaxed) as u64;
        let now = infermesh_runtime::time::now_unix_ms();
        let busy = match self.load.others_at(now) {
            Some(others) => mine + u64::from(others),
            None => self
                .load
                .fresh_at(now)
                .map_or(0, |(running, waiting, _)| u64::from(running + waiting))
                .max(mine),
        };
        busy >= bound
    }
}
