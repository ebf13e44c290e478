//! Round robin: candidates in turn, one turn counter per model route. A
//! turn is counted only when a candidate is chosen; with a replica left
//! out (tried or ejected) the turn indexes the candidates left.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::RngCore;

use super::{Balancer, Candidates, Pick, Reason, RouteHints};

/// Candidates in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A copy at the same turn, whose picks leave this one's turn alone.
    pub fn peek(&self) -> RoundRobin {
        RoundRobin {
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        _hints: &RouteHints,
        _rng: &mut dyn RngCore,
    ) -> Option<Pick> {
        let replicas = candidates.replicas();
        if replicas.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % replicas.len();
        Some(Pick {
            upstream: replicas[turn].clone(),
            reason: Reason::RoundRobin {
                replicas: candidates.of(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::fixtures::{busy, eject, replicas, rng};
    use super::*;
    use crate::replica::Upstream;

    fn turns(
        balancer: &RoundRobin,
        all: &[Arc<Upstream>],
        tried: &[String],
        n: usize,
    ) -> Vec<String> {
        let candidates = Candidates::new(all, tried);
        let mut rng = rng(0);
        (0..n)
            .map(|_| {
                let pick = balancer.pick(&candidates, &RouteHints::default(), &mut rng);
                pick.unwrap().upstream.id.clone()
            })
            .collect()
    }

    #[test]
    fn replicas_take_turns_whatever_their_load() {
        let all = replicas(&["a", "b", "c"]);
        busy(&all[0], 10);
        let balancer = RoundRobin::default();
        assert_eq!(turns(&balancer, &all, &[], 4), ["a", "b", "c", "a"]);
        let candidates = Candidates::new(&all, &[]);
        let pick = balancer.pick(&candidates, &RouteHints::default(), &mut rng(0));
        assert_eq!(pick.unwrap().reason.to_string(), "round robin over 3");
    }

    #[test]
    fn ejected_and_tried_replicas_are_left_out_of_the_turns() {
        let all = replicas(&["a", "b", "c", "d"]);
        eject(&all[1]);
        let balancer = RoundRobin::default();
        let tried = ["d".to_string()];
        assert_eq!(turns(&balancer, &all, &tried, 4), ["a", "c", "a", "c"]);
    }

    #[test]
    fn no_turn_is_taken_when_no_candidate_is_left() {
        let all = replicas(&["a", "b"]);
        let balancer = RoundRobin::default();
        let tried = ["a".to_string(), "b".to_string()];
        let candidates = Candidates::new(&all, &tried);
        assert!(
            balancer
                .pick(&candidates, &RouteHints::default(), &mut rng(0))
                .is_none()
        );
        assert_eq!(turns(&balancer, &all, &[], 2), ["a", "b"]);
    }
}
