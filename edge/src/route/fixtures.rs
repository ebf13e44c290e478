//! Replicas and seeded randomness for the balancers' tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::uri::Authority;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::health::EjectionPolicy;
use crate::replica::Upstream;

/// A serving replica named `id`, idle, healthy, with no load sample.
pub(super) fn replica(id: &str) -> Arc<Upstream> {
    Arc::new(Upstream {
        id: id.to_string(),
        pool: "llama-eu".into(),
        authority: Authority::from_static("127.0.0.1:1000"),
        mesh_authority: None,
        in_flight: Arc::default(),
        health: Arc::default(),
        load: Arc::default(),
        fingerprint: String::new(),
    })
}

/// One idle replica per id, in order.
pub(super) fn replicas(ids: &[&str]) -> Vec<Arc<Upstream>> {
    ids.iter().map(|id| replica(id)).collect()
}

/// Gives `replica` `n` requests in flight.
pub(super) fn busy(replica: &Upstream, n: usize) {
    replica.in_flight.store(n, Ordering::Relaxed);
}

/// Ejects `replica` (one failure ejects it for the base interval).
pub(super) fn eject(replica: &Upstream) {
    let policy = EjectionPolicy {
        consecutive: 1,
        ..EjectionPolicy::default()
    };
    assert!(replica.health.failure(&policy).is_some());
    assert!(replica.health.is_ejected());
}

/// A generator that gives the same draws on every run.
pub(super) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}
