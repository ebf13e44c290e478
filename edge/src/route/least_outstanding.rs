//! Least outstanding: the candidate with the fewest requests in flight
//! from this edge. Ties are broken from a random start, so idle replicas
//! share the load instead of the first one in the table taking it all.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::{Rng, RngCore};

use super::{Balancer, Candidates, Pick, Reason, RouteHints};
use crate::replica::Upstream;

/// The candidate with the fewest requests in flight.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastOutstanding;

impl LeastOutstanding {
    /// The candidate with the fewest requests in flight, and that count.
    pub(crate) fn fewest<'a>(
        candidates: &Candidates<'a>,
        rng: &mut dyn RngCore,
    ) -> Option<(&'a Arc<Upstream>, usize)> {
        let replicas = candidates.replicas();
        let n = replicas.len();
        if n == 0 {
            return None;
        }
        let start = rng.random_range(0..n);
        (0..n)
            .map(|i| replicas[(start + i) % n])
            .map(|u| (u, u.in_flight.load(Ordering::Relaxed)))
            .min_by_key(|(_, in_flight)| *in_flight)
    }
}

impl Balancer for LeastOutstanding {
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        _hints: &RouteHints,
        rng: &mut dyn RngCore,
    ) -> Option<Pick> {
        let (chosen, in_flight) = Self::fewest(candidates, rng)?;
        Some(Pick {
            upstream: chosen.clone(),
            reason: Reason::FewestInFlight {
                in_flight,
                replicas: candidates.of(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::super::fixtures::{busy, eject, replicas, rng};
    use super::*;

    fn pick(all: &[Arc<Upstream>], tried: &[String], seed: u64) -> Option<Pick> {
        let candidates = Candidates::new(all, tried);
        LeastOutstanding.pick(&candidates, &RouteHints::default(), &mut rng(seed))
    }

    #[test]
    fn the_idle_replica_gets_the_request_over_busy_ones() {
        let all = replicas(&["a", "b", "c"]);
        busy(&all[0], 5);
        busy(&all[2], 1);
        for seed in 0..20 {
            let chosen = pick(&all, &[], seed).unwrap();
            assert_eq!(chosen.upstream.id, "b");
            assert_eq!(chosen.reason.to_string(), "fewest in flight (0) of 3");
        }
    }

    #[test]
    fn the_least_busy_wins_when_none_is_idle() {
        let all = replicas(&["a", "b"]);
        busy(&all[0], 2);
        busy(&all[1], 7);
        let chosen = pick(&all, &[], 3).unwrap();
        assert_eq!(chosen.upstream.id, "a");
        assert_eq!(chosen.reason.to_string(), "fewest in flight (2) of 2");
    }

    #[test]
    fn ties_spread_over_the_tied_replicas_and_a_seed_repeats_its_choices() {
        let all = replicas(&["a", "b", "c", "d"]);
        busy(&all[3], 1);
        let choices = |seed| -> Vec<String> {
            let mut rng = rng(seed);
            let candidates = Candidates::new(&all, &[]);
            (0..40)
                .map(|_| {
                    let pick = LeastOutstanding.pick(&candidates, &RouteHints::default(), &mut rng);
                    pick.unwrap().upstream.id.clone()
                })
                .collect()
        };
        let first = choices(11);
        assert_eq!(first, choices(11));
        let chosen: HashSet<_> = first.iter().map(String::as_str).collect();
        assert_eq!(chosen, HashSet::from(["a", "b", "c"]));
    }

    #[test]
    fn ejected_and_tried_replicas_are_skipped() {
        let all = replicas(&["a", "b", "c"]);
        busy(&all[2], 9);
        eject(&all[0]);
        for seed in 0..10 {
            assert_eq!(pick(&all, &[], seed).unwrap().upstream.id, "b");
            let retry = pick(&all, &["b".to_string()], seed).unwrap();
            assert_eq!(retry.upstream.id, "c");
        }
    }

    #[test]
    fn nothing_is_chosen_when_no_candidate_is_left() {
        let all = replicas(&["a"]);
        assert!(pick(&all, &["a".to_string()], 0).is_none());
        assert!(pick(&[], &[], 0).is_none());
    }
}
