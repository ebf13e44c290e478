//! Choosing a replica for one attempt of a request: the candidates left
//! (not tried yet, not ejected), the model's balancing policy over them,
//! and why it chose. Each policy is a `Balancer` in a file of its own; the
//! source of randomness is passed in, so a seeded generator makes every
//! choice reproducible in tests. The reason is a value that is rendered
//! only when a trace or a log reads it. Nothing here sends a request or
//! changes a replica's in-flight count, health or load; prefix affinity
//! records which replica now holds the prompt.

use std::sync::Arc;

use rand::RngCore;

use crate::replica::Upstream;

pub mod adapter;
pub mod least_load;
mod least_outstanding;
mod prefix_affinity;
mod reason;
mod round_robin;
pub mod session_affinity;

#[cfg(test)]
pub(crate) mod fixtures;

pub use adapter::AdapterPlacement;
pub use least_load::LeastLoad;
pub use least_outstanding::LeastOutstanding;
pub use prefix_affinity::PrefixAffinity;
pub use reason::Reason;
pub use round_robin::RoundRobin;
pub use session_affinity::SessionAffinity;

/// How far past the least busy candidate's in-flight count the replica an
/// affinity prefers (the prefix holder, the session's owner) may be and
/// still get the request: its warm cache is worth a short wait, not a queue.
const AFFINITY_LOAD_SLACK: usize = 4;

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

/// What a request tells the policy beyond the model name.
#[derive(Debug, Default, Clone)]
pub struct RouteHints {
    /// Chained block keys of the prompt (prefix affinity).
    pub prefix: Option<Vec<u64>>,
    /// The session (session affinity).
    pub session: Option<String>,
}

/// A policy's choice: the replica and why.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The replica the attempt goes to.
    pub upstream: Arc<Upstream>,
    /// Why it was chosen.
    pub reason: Reason,
}

/// One balancing policy.
pub trait Balancer {
    /// The replica among `candidates` for this attempt, and why; `None`
    /// when no candidate is left.
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        hints: &RouteHints,
        rng: &mut dyn RngCore,
    ) -> Option<Pick>;
}

/// The replicas an attempt may go to: not one already tried, and not
/// ejected, unless every one left is (then ejections are ignored rather
/// than refuse the request); and not one at its pool's concurrency bound
/// while another has room.
#[derive(Debug)]
pub struct Candidates<'a> {
    replicas: Vec<&'a Arc<Upstream>>,
    healthy: bool,
    of: usize,
}

impl<'a> Candidates<'a> {
    /// The candidates among `upstreams` once `tried` (endpoint ids) are left out.
    pub fn new(upstreams: &'a [Arc<Upstream>], tried: &[String]) -> Self {
        let untried = || upstreams.iter().filter(|u| !tried.contains(&u.id));
        let healthy: Vec<_> = untried().filter(|u| !u.health.is_ejected()).collect();
        let (replicas, healthy) = if healthy.is_empty() {
            (untried().collect(), false)
        } else {
            (healthy, true)
        };
        // A replica at its pool's bound would queue the request in its
        // engine while another has a free slot.
        let replicas = if replicas.iter().any(|u| u.at_bound()) {
            let free: Vec<_> = replicas.iter().copied().filter(|u| !u.at_bound()).collect();
            if free.is_empty() { replicas } else { free }
        } else {
            replicas
        };
        Self {
            replicas,
            healthy,
            of: upstreams.len(),
        }
    }

    /// The candidates, in the route's order.
    pub fn replicas(&self) -> &[&'a Arc<Upstream>] {
        &self.replicas
    }

    /// How many replicas the route has, tried and ejected ones included.
    pub fn of(&self) -> usize {
        self.of
    }

    /// The candidate with endpoint id `id`, unless it is ejected (a
    /// replica an affinity prefers must be healthy: it is not worth a
    /// request that ejections would otherwise keep from it).
    pub fn healthy(&self, id: &str) -> Option<&'a Arc<Upstream>> {
        self.healthy
            .then(|| self.replicas.iter().copied().find(|u| u.id == id))
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{bounded, eject, replicas, rng, serving_table};
    use super::*;
    use crate::table::{EdgeTableBuilder, ModelRoute};
    use infermesh_proto::v1::RoutingPolicy;
    use infermesh_runtime::discovery::ApplyTable;
    use std::sync::atomic::Ordering;

    /// A built route for model `llama` under `policy` over serving replicas `ids`.
    fn route(policy: RoutingPolicy, ids: &[&str]) -> Arc<ModelRoute> {
        let table = EdgeTableBuilder::default()
            .apply(serving_table(policy, ids))
            .unwrap();
        table.route("llama").unwrap().clone()
    }

    fn ids(candidates: &Candidates<'_>) -> Vec<String> {
        candidates.replicas().iter().map(|u| u.id.clone()).collect()
    }

    #[test]
    fn candidates_leave_out_tried_and_ejected_replicas() {
        let all = replicas(&["a", "b", "c"]);
        eject(&all[1]);
        let candidates = Candidates::new(&all, &["c".to_string()]);
        assert_eq!(ids(&candidates), ["a"]);
        assert_eq!(candidates.of(), 3);
        assert!(candidates.healthy("a").is_some());
        assert!(candidates.healthy("b").is_none(), "ejected");
        assert!(candidates.healthy("c").is_none(), "tried");
    }

    #[test]
    fn ejections_are_ignored_when_every_untried_replica_is_ejected() {
        let all = replicas(&["a", "b", "c"]);
        eject(&all[0]);
        eject(&all[1]);
        let candidates = Candidates::new(&all, &["c".to_string()]);
        assert_eq!(ids(&candidates), ["a", "b"]);
        assert!(
            candidates.healthy("a").is_none(),
            "no affinity to an ejected replica"
        );
        let none = Candidates::new(&all, &["a".into(), "b".into(), "c".into()]);
        assert!(none.replicas().is_empty());
    }

    #[test]
    fn every_policy_chooses_nothing_when_every_replica_was_tried() {
        let tried = ["a".to_string(), "b".to_string()];
        let hints = RouteHints {
            prefix: Some(vec![1, 2]),
            session: Some("alice".into()),
        };
        for policy in [
            RoutingPolicy::LeastOutstanding,
            RoutingPolicy::RoundRobin,
            RoutingPolicy::PrefixAffinity,
            RoutingPolicy::LeastLoad,
            RoutingPolicy::SessionAffinity,
        ] {
            let route = route(policy, &["a", "b"]);
            assert!(route.choose_with(&hints, &tried, &mut rng(1)).is_none());
            assert!(
                route
                    .choose_with(&hints, &tried[..1], &mut rng(1))
                    .is_some()
            );
        }
        let empty = route(RoutingPolicy::LeastOutstanding, &[]);
        assert!(empty.choose(&RouteHints::default(), &[]).is_none());
    }

    #[test]
    fn affinity_policies_without_their_hint_balance_by_load() {
        let prefix = route(RoutingPolicy::PrefixAffinity, &["a", "b"]);
        prefix.upstreams[0].in_flight.store(3, Ordering::Relaxed);
        let (chosen, reason) = prefix
            .choose_with(&RouteHints::default(), &[], &mut rng(2))
            .unwrap();
        assert_eq!(chosen.id, "b");
        assert_eq!(reason.to_string(), "fewest in flight (0) of 2");
        let session = route(RoutingPolicy::SessionAffinity, &["a", "b"]);
        session.upstreams[0].in_flight.store(3, Ordering::Relaxed);
        let (chosen, reason) = session
            .choose_with(&RouteHints::default(), &[], &mut rng(2))
            .unwrap();
        assert_eq!(chosen.id, "b");
        assert!(matches!(reason, Reason::PowerOfTwo { .. }), "{reason}");
    }

    #[test]
    fn round_robin_takes_turns() {
        let route = route(RoutingPolicy::RoundRobin, &["a", "b"]);
        let picks: Vec<_> = (0..4)
            .map(|_| {
                route
                    .choose(&RouteHints::default(), &[])
                    .unwrap()
                    .0
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
    }

    #[test]
    fn least_load_prefers_the_replica_whose_engine_stamped_less_load() {
        let route = route(RoutingPolicy::LeastLoad, &["a", "b"]);
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
    fn a_replica_at_its_bound_is_passed_over_while_another_has_room() {
        let all = vec![bounded("a", 2), bounded("b", 2)];
        let hints = RouteHints {
            session: Some("alice".into()),
            ..Default::default()
        };
        let own = SessionAffinity
            .pick(&Candidates::new(&all, &[]), &hints, &mut rng(1))
            .unwrap()
            .upstream;
        let other = all.iter().find(|u| u.id != own.id).unwrap();
        own.in_flight.store(2, Ordering::Relaxed);
        let candidates = Candidates::new(&all, &[]);
        assert_eq!(candidates.replicas().len(), 1);
        let pick = SessionAffinity
            .pick(&candidates, &hints, &mut rng(1))
            .unwrap();
        assert_eq!(pick.upstream.id, other.id);
        // Its engine stamping a full batch counts too.
        other.load.update("r=2;w=0;kv=0.500");
        let candidates = Candidates::new(&all, &[]);
        assert_eq!(
            candidates.replicas().len(),
            2,
            "all at their bound: none left out"
        );
        let pick = SessionAffinity
            .pick(&candidates, &hints, &mut rng(1))
            .unwrap();
        assert_eq!(pick.upstream.id, own.id);
    }

    #[test]
    fn a_session_sticks_to_one_replica_and_sessions_spread() {
        let route = route(RoutingPolicy::SessionAffinity, &["a", "b", "c"]);
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
