//! Least load by power of two choices: two distinct random candidates, the
//! one with the lower load score wins. Comparing two instead of all keeps
//! edges that see the same stale samples from all piling onto the same
//! replica. The score is this edge's requests in flight plus, while the
//! replica's last load stamp is fresh, its engine's queue and KV-cache use.

use std::sync::atomic::Ordering;

use rand::{Rng, RngCore};

use super::{Balancer, Candidates, Pick, Reason, RouteHints};
use crate::replica::Upstream;

/// Power of two choices over the load score.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastLoad;

/// Load score: this edge's requests in flight, plus the engine's queue
/// (weighted: a queued request waits for a slot) and KV-cache pressure,
/// when a fresh sample is known.
pub fn score(upstream: &Upstream) -> f64 {
    let in_flight = upstream.in_flight.load(Ordering::Relaxed) as f64;
    match upstream.load.fresh() {
        Some((_running, waiting, kv)) => in_flight + 2.0 * f64::from(waiting) + 4.0 * kv,
        None => in_flight,
    }
}

impl Balancer for LeastLoad {
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        _hints: &RouteHints,
        rng: &mut dyn RngCore,
    ) -> Option<Pick> {
        let replicas = candidates.replicas();
        let n = replicas.len();
        if n < 2 {
            return replicas.first().map(|only| Pick {
                upstream: (*only).clone(),
                reason: Reason::OnlyCandidate,
            });
        }
        let a = rng.random_range(0..n);
        let b = (a + rng.random_range(1..n)) % n;
        let (x, y) = (replicas[a], replicas[b]);
        let (sx, sy) = (score(x), score(y));
        let (winner, loser, winner_score, loser_score) = if sx <= sy {
            (x, y, sx, sy)
        } else {
            (y, x, sy, sx)
        };
        Some(Pick {
            upstream: winner.clone(),
            reason: Reason::PowerOfTwo {
                winner: winner.clone(),
                winner_score,
                loser: loser.clone(),
                loser_score,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use infermesh_runtime::time::now_unix_ms;

    use super::super::fixtures::{busy, eject, replicas, rng};
    use super::*;

    fn pick(all: &[Arc<Upstream>], tried: &[String], seed: u64) -> Option<Pick> {
        let candidates = Candidates::new(all, tried);
        LeastLoad.pick(&candidates, &RouteHints::default(), &mut rng(seed))
    }

    #[test]
    fn a_fresh_sample_of_a_loaded_engine_outweighs_fewer_requests_in_flight() {
        let all = replicas(&["a", "b"]);
        all[0].load.update("r=4;w=6;kv=0.900");
        busy(&all[1], 2);
        all[1].load.update("r=1;w=0;kv=0.100");
        assert_eq!(score(&all[0]), 12.0 + 3.6);
        for seed in 0..20 {
            let chosen = pick(&all, &[], seed).unwrap();
            assert_eq!(chosen.upstream.id, "b");
            assert_eq!(
                chosen.reason.to_string(),
                "power of two: b (2.4) over a (15.6)"
            );
        }
    }

    #[test]
    fn a_stale_sample_is_ignored_and_requests_in_flight_decide() {
        let all = replicas(&["a", "b"]);
        all[0]
            .load
            .update_at("r=9;w=30;kv=1.0", 0, now_unix_ms() - 60_000);
        busy(&all[1], 1);
        assert_eq!(score(&all[0]), 0.0);
        for seed in 0..20 {
            assert_eq!(pick(&all, &[], seed).unwrap().upstream.id, "a");
        }
    }

    #[test]
    fn the_two_compared_are_distinct_and_every_replica_gets_a_turn_on_ties() {
        let all = replicas(&["a", "b", "c"]);
        let mut winners = HashSet::new();
        for seed in 0..40 {
            let chosen = pick(&all, &[], seed).unwrap();
            let Reason::PowerOfTwo { winner, loser, .. } = &chosen.reason else {
                panic!("{}", chosen.reason);
            };
            assert_ne!(winner.id, loser.id);
            assert_eq!(winner.id, chosen.upstream.id);
            winners.insert(chosen.upstream.id.clone());
        }
        assert_eq!(winners.len(), 3, "ties go to either of the two drawn");
        let again = pick(&all, &[], 7).unwrap().upstream.id.clone();
        assert_eq!(pick(&all, &[], 7).unwrap().upstream.id, again);
    }

    #[test]
    fn ejected_and_tried_replicas_are_never_drawn() {
        let all = replicas(&["a", "b", "c", "d"]);
        eject(&all[0]);
        busy(&all[2], 3);
        busy(&all[3], 3);
        let tried = ["b".to_string()];
        for seed in 0..20 {
            let chosen = pick(&all, &tried, seed).unwrap();
            assert!(["c", "d"].contains(&chosen.upstream.id.as_str()));
        }
    }

    #[test]
    fn a_single_candidate_is_chosen_without_a_draw_and_none_left_chooses_nothing() {
        let all = replicas(&["a", "b"]);
        busy(&all[0], 50);
        let chosen = pick(&all, &["b".to_string()], 0).unwrap();
        assert_eq!(chosen.upstream.id, "a");
        assert_eq!(chosen.reason.to_string(), "only candidate");
        assert!(pick(&all, &["a".into(), "b".into()], 0).is_none());
    }
}
