//! The edge's routing table: what a pushed `RoutingTable` means to the
//! request path (routes by model name, the replicas' live counters, the
//! balancing policies). Building it from a push, and leaving out objects
//! that cannot be used, is `build`'s job.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::uri::Authority;
use rand::Rng;

use crate::access::Access;
use crate::health::Health;
use crate::prefix::PrefixIndex;

pub(crate) mod build;
pub(crate) mod load;
pub(crate) mod skips;

pub use build::EdgeTableBuilder;
pub use load::LoadSample;
pub use skips::{ObjectKind, Skipped};

/// How a model's replica is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The replica with the fewest requests in flight from this edge.
    LeastOutstanding,
    /// Replicas in turn.
    RoundRobin,
    /// The replica holding the longest prompt prefix, bounded by load.
    PrefixAffinity,
    /// Power of two choices over in-flight requests and the replica's load.
    LeastLoad,
    /// The same replica for the same session, bounded by load.
    SessionAffinity,
}

impl Policy {
    /// The policy's name in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LeastOutstanding => "least_outstanding",
            Policy::RoundRobin => "round_robin",
            Policy::PrefixAffinity => "prefix_affinity",
            Policy::LeastLoad => "least_load",
            Policy::SessionAffinity => "session_affinity",
        }
    }
}

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
}

/// What a request tells the policy beyond the model name.
#[derive(Debug, Default, Clone)]
pub struct RouteHints {
    /// Chained block keys of the prompt (prefix affinity).
    pub prefix: Option<Vec<u64>>,
    /// The session (session affinity).
    pub session: Option<String>,
}

impl Upstream {
    /// Load score for power of two choices: this edge's requests in flight,
    /// plus the engine's queue (weighted: a queued request waits for a slot)
    /// and KV-cache pressure, when a fresh sample is known.
    pub fn score(&self) -> f64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed) as f64;
        match self.load.fresh() {
            Some((_running, waiting, kv)) => in_flight + 2.0 * f64::from(waiting) + 4.0 * kv,
            None => in_flight,
        }
    }
}

/// Everything needed to route one model.
#[derive(Debug)]
pub struct ModelRoute {
    /// Canonical model name.
    pub model: String,
    /// Replica choice.
    pub policy: Policy,
    /// Serving replicas in this region.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Response-cache settings, when the model has them.
    pub cache: Option<infermesh_proto::v1::CachePolicy>,
    /// Models to serve instead, in order, when this one has no replica anywhere reachable.
    pub fallbacks: Vec<String>,
    /// Which replica holds which prompt prefixes (kept across pushes).
    pub prefixes: Arc<PrefixIndex>,
    /// Whether answers carry the `x-infermesh-route` receipt.
    pub receipts: bool,
    /// The model's own deadlines, if it sets any.
    pub timeouts: Option<infermesh_proto::v1::ModelTimeouts>,
    /// Engine-specific request fields clients may send for it.
    pub engine_fields: infermesh_runtime::engine_fields::FieldSet,
    /// A pool of this region that scales to zero: requests wait for it.
    pub cold_start: Option<ColdStart>,
    next: AtomicUsize,
}

/// A pool that may have no replica because it scaled to zero.
#[derive(Debug, Clone)]
pub struct ColdStart {
    /// Pool name, sent to the control plane as demand.
    pub pool: String,
    /// How long a request waits for a replica.
    pub timeout: std::time::Duration,
}

/// How long a request waits for a pool to scale up when the pool sets none.
pub const DEFAULT_COLD_START: std::time::Duration = std::time::Duration::from_secs(120);

/// How far past the least busy replica's in-flight count the prefix holder
/// may be and still get the request.
const PREFIX_LOAD_SLACK: usize = 4;

impl ModelRoute {
    /// The replica for the next request, or `None` when none is serving.
    pub fn pick(&self) -> Option<&Arc<Upstream>> {
        self.pick_excluding(&[])
    }

    /// Replicas an attempt may go to: not one of `tried`, and not ejected
    /// (unless every other one is).
    fn candidates(&self, tried: &[String]) -> Vec<&Arc<Upstream>> {
        let fresh = |u: &&Arc<Upstream>| !tried.contains(&u.id);
        let healthy: Vec<&Arc<Upstream>> = self
            .upstreams
            .iter()
            .filter(fresh)
            .filter(|u| !u.health.is_ejected())
            .collect();
        if healthy.is_empty() {
            self.upstreams.iter().filter(fresh).collect()
        } else {
            healthy
        }
    }

    /// The replica for the next attempt by round robin or fewest in flight.
    pub fn pick_excluding(&self, tried: &[String]) -> Option<&Arc<Upstream>> {
        let candidates = self.candidates(tried);
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => Some(candidates[self.next.fetch_add(1, Ordering::Relaxed) % n]),
            _ => {
                // A random start spreads ties instead of always favouring the first replica.
                let start = rand::rng().random_range(0..n);
                (0..n)
                    .map(|i| candidates[(start + i) % n])
                    .min_by_key(|u| u.in_flight.load(Ordering::Relaxed))
            }
        }
    }

    /// The replica for an attempt under the model's policy, and why.
    pub fn choose(&self, hints: &RouteHints, tried: &[String]) -> Option<(Arc<Upstream>, String)> {
        match (self.policy, &hints.prefix, &hints.session) {
            (Policy::PrefixAffinity, Some(keys), _) => self.pick_by_prefix(keys, tried),
            (Policy::SessionAffinity, _, Some(session)) => self.pick_by_session(session, tried),
            (Policy::LeastLoad | Policy::SessionAffinity, _, _) => self.pick_least_load(tried),
            _ => self
                .pick_excluding(tried)
                .map(|u| (u.clone(), self.reason(u))),
        }
    }

    /// Power of two choices: two random candidates, the lower load score wins.
    pub fn pick_least_load(&self, tried: &[String]) -> Option<(Arc<Upstream>, String)> {
        let candidates = self.candidates(tried);
        match candidates.len() {
            0 => None,
            1 => Some((candidates[0].clone(), "only candidate".into())),
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (x, y) = (candidates[a], candidates[b]);
                let (sx, sy) = (x.score(), y.score());
                let (winner, loser, ws, ls) = if sx <= sy {
                    (x, y, sx, sy)
                } else {
                    (y, x, sy, sx)
                };
                let reason = format!(
                    "power of two: {} ({ws:.1}) over {} ({ls:.1})",
                    winner.id, loser.id
                );
                Some((winner.clone(), reason))
            }
        }
    }

    /// Session affinity: the candidate the session hashes to (rendezvous
    /// hashing, so a replica leaving moves only its own sessions), unless
    /// it is much busier than the least busy one.
    pub fn pick_by_session(
        &self,
        session: &str,
        tried: &[String],
    ) -> Option<(Arc<Upstream>, String)> {
        let candidates = self.candidates(tried);
        // Rendezvous hashing with XXH3, the same on every edge and build.
        let session_key = xxhash_rust::xxh3::xxh3_64(session.as_bytes());
        let owner = candidates
            .iter()
            .max_by_key(|u| xxhash_rust::xxh3::xxh3_64_with_seed(u.id.as_bytes(), session_key))?;
        let least = candidates
            .iter()
            .min_by_key(|u| u.in_flight.load(Ordering::Relaxed))?;
        let (owner_load, least_load) = (
            owner.in_flight.load(Ordering::Relaxed),
            least.in_flight.load(Ordering::Relaxed),
        );
        if owner_load <= least_load + PREFIX_LOAD_SLACK {
            Some(((*owner).clone(), "session affinity".into()))
        } else {
            let reason = format!(
                "session replica {} busy ({owner_load} in flight); fewest in flight",
                owner.id
            );
            Some(((*least).clone(), reason))
        }
    }

    /// Prefix affinity: the replica holding the longest prefix of `keys`
    /// unless it is busier than the least busy candidate by more than the
    /// slack, else the least busy; records the prompt as held by the
    /// choice. Returns the choice and why.
    pub fn pick_by_prefix(
        &self,
        keys: &[u64],
        tried: &[String],
    ) -> Option<(Arc<Upstream>, String)> {
        let least = self.pick_excluding(tried)?.clone();
        let least_load = least.in_flight.load(Ordering::Relaxed);
        let eligible = |id: &str| {
            self.upstreams
                .iter()
                .any(|u| &*u.id == id && !tried.contains(&u.id) && !u.health.is_ejected())
        };
        let (chosen, reason) = match self.prefixes.longest(keys, eligible) {
            Some((owner, blocks)) => {
                let holder = self.upstreams.iter().find(|u| *u.id == *owner)?.clone();
                let load = holder.in_flight.load(Ordering::Relaxed);
                if load <= least_load + PREFIX_LOAD_SLACK {
                    (
                        holder,
                        format!("prefix match: {blocks} of {} blocks", keys.len()),
                    )
                } else {
                    let reason = format!(
                        "prefix holder {} busy ({load} in flight); fewest in flight ({least_load})",
                        holder.id
                    );
                    (least, reason)
                }
            }
            None => (
                least,
                format!("no prefix match; fewest in flight ({least_load})"),
            ),
        };
        let id: Arc<str> = Arc::from(chosen.id.as_str());
        self.prefixes.record(keys, &id);
        Some((chosen, reason))
    }

    /// Why `chosen` was picked, for the routing span.
    pub fn reason(&self, chosen: &Upstream) -> String {
        match self.policy {
            Policy::RoundRobin => format!("round robin over {}", self.upstreams.len()),
            _ => format!(
                "fewest in flight ({}) of {}",
                chosen.in_flight.load(Ordering::Relaxed),
                self.upstreams.len()
            ),
        }
    }
}

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone)]
pub struct ListedModel {
    /// Canonical name.
    pub name: String,
    /// Other accepted names.
    pub aliases: Vec<String>,
}

/// The edge's view of one routing-table version.
#[derive(Debug, Default)]
pub struct EdgeTable {
    routes: HashMap<String, Arc<ModelRoute>>,
    /// Models in name order.
    pub models: Vec<ListedModel>,
    /// Region the table is for.
    pub region: String,
    /// API keys and tenants.
    pub access: Access,
    /// Edges of the regions this one spills over to, in failover order.
    pub failover: Vec<PeerEdge>,
    /// Read from the saved file at start, not pushed by a control plane
    /// since: possibly stale.
    pub from_disk: bool,
    /// Objects of the pushed table that were left out, and why.
    pub skipped: Vec<Skipped>,
    /// Ids of every endpoint in the table, in any state.
    pub endpoint_ids: std::collections::HashSet<String>,
}

/// Another region's edge, reached when this region cannot serve a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEdge {
    /// Its region.
    pub region: String,
    /// Its `host:port`.
    pub authority: Authority,
    /// The same address carrying the identity its certificate must name
    /// (`spiffe://infermesh/edge/<region>`) under mutual TLS.
    pub mesh_authority: Option<Authority>,
}

impl EdgeTable {
    /// The route for a model name or alias.
    pub fn route(&self, name: &str) -> Option<&Arc<ModelRoute>> {
        self.routes.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{Endpoint, EndpointState, Model, Pool, RoutingPolicy, RoutingTable};
    use infermesh_runtime::discovery::ApplyTable;

    fn table(endpoints: &[(&str, &str, EndpointState)]) -> RoutingTable {
        RoutingTable {
            version: 7,
            region: "eu".into(),
            models: vec![Model {
                name: "llama".into(),
                aliases: vec!["l3".into()],
                ..Default::default()
            }],
            pools: vec![Pool {
                name: "llama-eu".into(),
                model: "llama".into(),
                region: "eu".into(),
                ..Default::default()
            }],
            endpoints: endpoints
                .iter()
                .map(|(id, address, state)| Endpoint {
                    id: id.to_string(),
                    pool: "llama-eu".into(),
                    model: "llama".into(),
                    address: address.to_string(),
                    state: *state as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn serving_endpoints_are_routable_by_name_and_alias() {
        let t = EdgeTableBuilder::default()
            .apply(table(&[
                ("a", "127.0.0.1:1000", EndpointState::Serving),
                ("b", "127.0.0.1:1001", EndpointState::Draining),
                ("c", "127.0.0.1:1002", EndpointState::Unhealthy),
            ]))
            .unwrap();
        let route = t.route("l3").expect("alias routes");
        assert_eq!(route.model, "llama");
        let ids: Vec<_> = route.upstreams.iter().map(|u| u.id.as_str()).collect();
        assert_eq!(ids, ["a"], "draining and unhealthy replicas get nothing");
        assert!(t.route("unknown").is_none());
    }

    #[test]
    fn least_outstanding_prefers_the_idle_replica_and_counters_survive_a_push() {
        let mut builder = EdgeTableBuilder::default();
        let eps = [
            ("a", "127.0.0.1:1000", EndpointState::Serving),
            ("b", "127.0.0.1:1001", EndpointState::Serving),
        ];
        let first = builder.apply(table(&eps)).unwrap();
        let route = first.route("llama").unwrap();
        route.upstreams[0].in_flight.store(5, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(route.pick().unwrap().id, "b");
        }
        let second = builder.apply(table(&eps)).unwrap();
        let a = &second.route("llama").unwrap().upstreams[0];
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn round_robin_takes_turns() {
        let mut t = table(&[
            ("a", "127.0.0.1:1000", EndpointState::Serving),
            ("b", "127.0.0.1:1001", EndpointState::Serving),
        ]);
        t.models[0].routing_policy = RoutingPolicy::RoundRobin as i32;
        let t = EdgeTableBuilder::default().apply(t).unwrap();
        let route = t.route("llama").unwrap();
        let picks: Vec<_> = (0..4).map(|_| route.pick().unwrap().id.clone()).collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
    }

    #[test]
    fn least_load_prefers_the_replica_whose_engine_stamped_less_load() {
        let mut t = table(&[
            ("a", "127.0.0.1:1000", EndpointState::Serving),
            ("b", "127.0.0.1:1001", EndpointState::Serving),
        ]);
        t.models[0].routing_policy = RoutingPolicy::LeastLoad as i32;
        let t = EdgeTableBuilder::default().apply(t).unwrap();
        let route = t.route("llama").unwrap();
        let by_id = |id: &str| route.upstreams.iter().find(|u| u.id == id).unwrap().clone();
        by_id("a").load.update("r=4;w=6;kv=0.900");
        by_id("b").load.update("r=1;w=0;kv=0.100");
        by_id("b").load.update("garbage");
        assert_eq!(by_id("b").load.fresh(), Some((1, 0, 0.1)));
        for _ in 0..20 {
            let (chosen, reason) = route.choose(&RouteHints::default(), &[]).unwrap();
            assert_eq!(chosen.id, "b", "{reason}");
        }
    }

    #[test]
    fn a_session_sticks_to_one_replica_and_sessions_spread() {
        let mut t = table(&[
            ("a", "127.0.0.1:1000", EndpointState::Serving),
            ("b", "127.0.0.1:1001", EndpointState::Serving),
            ("c", "127.0.0.1:1002", EndpointState::Serving),
        ]);
        t.models[0].routing_policy = RoutingPolicy::SessionAffinity as i32;
        let t = EdgeTableBuilder::default().apply(t).unwrap();
        let route = t.route("llama").unwrap();
        let hints = |session: &str| RouteHints {
            session: Some(session.to_string()),
            ..Default::default()
        };
        let first = route.choose(&hints("alice"), &[]).unwrap().0.id.clone();
        for _ in 0..10 {
            assert_eq!(route.choose(&hints("alice"), &[]).unwrap().0.id, first);
        }
        let owners: std::collections::HashSet<String> = (0..60)
            .map(|i| {
                route
                    .choose(&hints(&format!("user-{i}")), &[])
                    .unwrap()
                    .0
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(owners.len(), 3, "sessions spread over every replica");
        // Retried elsewhere when its replica failed.
        let other = route
            .choose(&hints("alice"), std::slice::from_ref(&first))
            .unwrap()
            .0;
        assert_ne!(other.id, first);
    }
}
