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
