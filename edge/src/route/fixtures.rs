//! Replicas, tables and seeded randomness for the balancers' tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::uri::Authority;
use infermesh_proto::v1::{Endpoint, EndpointState, Model, Pool, RoutingPolicy, RoutingTable};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::health::EjectionPolicy;
use crate::replica::Upstream;

/// A serving replica named `id`, idle, healthy, with no load sample.
pub(crate) fn replica(id: &str) -> Arc<Upstream> {
    Arc::new(Upstream {
        id: id.to_string(),
        pool: "llama-eu".into(),
        authority: Authority::from_static("127.0.0.1:1000"),
        mesh_authority: None,
        in_flight: Arc::default(),
        health: Arc::default(),
        load: Arc::default(),
        fingerprint: String::new(),
        max_concurrency: 0,
    })
}

/// An idle replica named `id` of a pool that runs `max_concurrency`
/// requests at once.
pub(crate) fn bounded(id: &str, max_concurrency: u32) -> Arc<Upstream> {
    let mut upstream = Arc::into_inner(replica(id)).expect("not shared yet");
    upstream.max_concurrency = max_concurrency;
    Arc::new(upstream)
}

/// One idle replica per id, in order.
pub(crate) fn replicas(ids: &[&str]) -> Vec<Arc<Upstream>> {
    ids.iter().map(|id| replica(id)).collect()
}

/// Gives `replica` `n` requests in flight.
pub(crate) fn busy(replica: &Upstream, n: usize) {
    replica.in_flight.store(n, Ordering::Relaxed);
}

/// Ejects `replica` (one failure ejects it for the base interval).
pub(crate) fn eject(replica: &Upstream) {
    let policy = EjectionPolicy {
        consecutive: 1,
        ..EjectionPolicy::default()
    };
    assert!(replica.health.failure(&policy).is_some());
    assert!(replica.health.is_ejected());
}

/// A generator that gives the same draws on every run.
pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A table of region `eu` serving `llama` (alias `l3`) under `policy` on
/// serving replicas `ids` of pool `llama-eu`.
pub(crate) fn serving_table(policy: RoutingPolicy, ids: &[&str]) -> RoutingTable {
    RoutingTable {
        version: 7,
        region: "eu".into(),
        models: vec![Model {
            name: "llama".into(),
            aliases: vec!["l3".into()],
            routing_policy: policy as i32,
            ..Default::default()
        }],
        pools: vec![Pool {
            name: "llama-eu".into(),
            model: "llama".into(),
            region: "eu".into(),
            ..Default::default()
        }],
        endpoints: ids
            .iter()
            .enumerate()
            .map(|(i, id)| Endpoint {
                id: id.to_string(),
                pool: "llama-eu".into(),
                model: "llama".into(),
                address: format!("127.0.0.1:{}", 1000 + i),
                state: EndpointState::Serving as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
