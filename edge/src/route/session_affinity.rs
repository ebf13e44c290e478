//! Session affinity: the same session goes to the same replica, whose
//! engine still holds the conversation in its KV cache. The replica is the
//! candidate the session hashes highest with (rendezvous hashing, XXH3: the
//! same on every edge and build, and a replica leaving moves only its own
//! sessions), unless it is much busier than the least busy candidate.
//! Without a session the request is balanced by least load.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::RngCore;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{AFFINITY_LOAD_SLACK, Balancer, Candidates, LeastLoad, Pick, Reason, RouteHints};
use crate::replica::Upstream;

/// The session's replica, bounded by load.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionAffinity;

/// The replica among `replicas` that `session` hashes highest with.
pub fn owner<'r, 'a>(
    replicas: &'r [&'a Arc<Upstream>],
    session: &str,
) -> Option<&'r &'a Arc<Upstream>> {
    let session_key = xxh3_64(session.as_bytes());
    replicas
        .iter()
        .max_by_key(|u| xxh3_64_with_seed(u.id.as_bytes(), session_key))
}

impl Balancer for SessionAffinity {
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        hints: &RouteHints,
        rng: &mut dyn RngCore,
    ) -> Option<Pick> {
        let Some(session) = &hints.session else {
            return LeastLoad.pick(candidates, hints, rng);
        };
        let replicas = candidates.replicas();
        let owner = owner(replicas, session)?;
        let least = replicas
            .iter()
            .min_by_key(|u| u.in_flight.load(Ordering::Relaxed))?;
        let (owner_load, least_load) = (
            owner.in_flight.load(Ordering::Relaxed),
            least.in_flight.load(Ordering::Relaxed),
        );
        let pick = if owner_load <= least_load + AFFINITY_LOAD_SLACK {
            Pick {
                upstream: (*owner).clone(),
                reason: Reason::Session,
            }
        } else {
            Pick {
                upstream: (*least).clone(),
                reason: Reason::SessionOwnerBusy {
                    owner: (*owner).clone(),
                    in_flight: owner_load,
                },
            }
        };
        Some(pick)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::super::fixtures::{busy, eject, replicas, rng};
    use super::*;
    use crate::replica::Upstream;

    fn session(name: &str) -> RouteHints {
        RouteHints {
            session: Some(name.to_string()),
            ..Default::default()
        }
    }

    fn pick(all: &[Arc<Upstream>], tried: &[String], name: &str) -> Option<Pick> {
        let candidates = Candidates::new(all, tried);
        SessionAffinity.pick(&candidates, &session(name), &mut rng(0))
    }

    fn owner(all: &[Arc<Upstream>], name: &str) -> String {
        pick(all, &[], name).unwrap().upstream.id.clone()
    }

    #[test]
    fn a_session_sticks_to_its_replica_whatever_the_draws() {
        let all = replicas(&["a", "b", "c"]);
        let first = owner(&all, "alice");
        let candidates = Candidates::new(&all, &[]);
        for seed in 0..20 {
            let chosen = SessionAffinity
                .pick(&candidates, &session("alice"), &mut rng(seed))
                .unwrap();
            assert_eq!(chosen.upstream.id, first);
            assert_eq!(chosen.reason.to_string(), "session affinity");
        }
    }

    #[test]
    fn sessions_spread_and_a_replica_leaving_moves_only_its_own() {
        let all = replicas(&["a", "b", "c"]);
        let names: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
        let before: Vec<String> = names.iter().map(|n| owner(&all, n)).collect();
        let spread: HashSet<&str> = before.iter().map(String::as_str).collect();
        assert_eq!(spread.len(), 3, "sessions spread over every replica");
        let without_c = replicas(&["a", "b"]);
        for (name, was) in names.iter().zip(&before) {
            let now = owner(&without_c, name);
            if was != "c" {
                assert_eq!(&now, was, "{name} moved though its replica stayed");
            }
        }
    }

    #[test]
    fn a_busy_owner_within_the_slack_keeps_its_session_beyond_it_loses_it() {
        let all = replicas(&["a", "b", "c"]);
        let first = owner(&all, "alice");
        let at = |id: &str| all.iter().find(|u| u.id == id).unwrap();
        let others: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|id| *id != first)
            .collect();
        busy(at(others[0]), 1);
        busy(at(others[1]), 2);
        busy(at(&first), 1 + AFFINITY_LOAD_SLACK);
        assert_eq!(owner(&all, "alice"), first);
        busy(at(&first), 2 + AFFINITY_LOAD_SLACK);
        let chosen = pick(&all, &[], "alice").unwrap();
        assert_eq!(chosen.upstream.id, others[0]);
        assert_eq!(
            chosen.reason.to_string(),
            format!("session replica {first} busy (6 in flight); fewest in flight")
        );
    }

    #[test]
    fn a_tried_or_ejected_owner_hands_the_session_to_another_replica() {
        let all = replicas(&["a", "b", "c"]);
        let first = owner(&all, "alice");
        let retry = pick(&all, std::slice::from_ref(&first), "alice").unwrap();
        assert_ne!(retry.upstream.id, first);
        eject(all.iter().find(|u| u.id == first).unwrap());
        assert_eq!(owner(&all, "alice"), retry.upstream.id);
    }

    #[test]
    fn without_a_session_the_least_loaded_of_two_draws_wins() {
        let all = replicas(&["a", "b"]);
        busy(&all[0], 3);
        let candidates = Candidates::new(&all, &[]);
        let chosen = SessionAffinity
            .pick(&candidates, &RouteHints::default(), &mut rng(4))
            .unwrap();
        assert_eq!(chosen.upstream.id, "b");
        assert_eq!(
            chosen.reason.to_string(),
            "power of two: b (0.0) over a (3.0)"
        );
    }

    #[test]
    fn nothing_is_chosen_when_no_candidate_is_left() {
        let all = replicas(&["a"]);
        assert!(pick(&all, &["a".to_string()], "alice").is_none());
    }
}
