//! Prefix affinity: the candidate that last served the longest prefix of
//! the prompt, whose engine most likely still holds it in its KV cache,
//! unless it is much busier than the least busy candidate. Either way the
//! prompt is recorded as held by the replica chosen. Without a prompt to
//! key the request is balanced by fewest in flight.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::RngCore;

use super::{
    AFFINITY_LOAD_SLACK, Balancer, Candidates, LeastOutstanding, Pick, Reason, RouteHints,
};
use crate::prefix::PrefixIndex;

/// The prefix holder, bounded by load, over a model's prefix index.
#[derive(Debug, Clone, Copy)]
pub struct PrefixAffinity<'a> {
    index: &'a PrefixIndex,
    /// Whether a pick records the prompt as held by the replica chosen.
    record: bool,
}

impl<'a> PrefixAffinity<'a> {
    /// Prefix affinity over `index`, the model's record of who holds what.
    pub fn new(index: &'a PrefixIndex) -> Self {
        Self {
            index,
            record: true,
        }
    }

    /// Prefix affinity over `index` that records nothing: what a pick
    /// would be, for explaining it.
    pub fn preview(index: &'a PrefixIndex) -> Self {
        Self {
            index,
            record: false,
        }
    }
}

impl Balancer for PrefixAffinity<'_> {
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        hints: &RouteHints,
        rng: &mut dyn RngCore,
    ) -> Option<Pick> {
        let Some(keys) = &hints.prefix else {
            return LeastOutstanding.pick(candidates, hints, rng);
        };
        let (least, least_in_flight) = LeastOutstanding::fewest(candidates, rng)?;
        let holder = self
            .index
            .longest(keys, |id| candidates.healthy(id).is_some())
            .and_then(|(owner, blocks)| Some((candidates.healthy(&owner)?, blocks)));
        let (chosen, reason) = match holder {
            Some((holder, blocks)) => {
                let in_flight = holder.in_flight.load(Ordering::Relaxed);
                if in_flight <= least_in_flight + AFFINITY_LOAD_SLACK {
                    let reason = Reason::PrefixMatch {
                        blocks,
                        of: keys.len(),
                    };
                    (holder, reason)
                } else {
                    let reason = Reason::PrefixHolderBusy {
                        holder: holder.clone(),
                        in_flight,
                        least_in_flight,
                    };
                    (least, reason)
                }
            }
            None => (least, Reason::NoPrefixMatch { least_in_flight }),
        };
        if self.record {
            let id: Arc<str> = Arc::from(chosen.id.as_str());
            self.index.record(keys, &id);
        }
        Some(Pick {
            upstream: chosen.clone(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{busy, eject, replicas, rng};
    use super::*;
    use crate::replica::Upstream;

    const PROMPT: [u64; 3] = [11, 12, 13];

    fn prompt(keys: &[u64]) -> RouteHints {
        RouteHints {
            prefix: Some(keys.to_vec()),
            ..Default::default()
        }
    }

    fn pick(index: &PrefixIndex, all: &[Arc<Upstream>], tried: &[String], keys: &[u64]) -> Pick {
        let candidates = Candidates::new(all, tried);
        PrefixAffinity::new(index)
            .pick(&candidates, &prompt(keys), &mut rng(5))
            .unwrap()
    }

    /// An index in which replica `id` served `keys`.
    fn held_by(id: &str, keys: &[u64]) -> PrefixIndex {
        let index = PrefixIndex::default();
        index.record(keys, &Arc::from(id));
        index
    }

    #[test]
    fn a_new_prompt_goes_to_the_least_busy_and_returns_there() {
        let all = replicas(&["a", "b", "c"]);
        busy(&all[0], 2);
        busy(&all[2], 1);
        let index = PrefixIndex::default();
        let first = pick(&index, &all, &[], &PROMPT);
        assert_eq!(first.upstream.id, "b");
        assert_eq!(
            first.reason.to_string(),
            "no prefix match; fewest in flight (0)"
        );
        busy(&all[1], 3);
        let again = pick(&index, &all, &[], &PROMPT);
        assert_eq!(again.upstream.id, "b", "{}", again.reason);
        assert_eq!(again.reason.to_string(), "prefix match: 3 of 3 blocks");
    }

    #[test]
    fn the_holder_of_the_longest_prefix_wins() {
        let all = replicas(&["a", "b"]);
        let index = held_by("a", &PROMPT[..2]);
        index.record(&PROMPT[..1], &Arc::from("b"));
        let chosen = pick(&index, &all, &[], &[11, 12, 99, 100]);
        assert_eq!(chosen.upstream.id, "a");
        assert_eq!(chosen.reason.to_string(), "prefix match: 2 of 4 blocks");
    }

    #[test]
    fn a_holder_busier_than_the_slack_allows_loses_the_prompt_to_the_least_busy() {
        let all = replicas(&["a", "b"]);
        let index = held_by("a", &PROMPT);
        busy(&all[0], 1 + AFFINITY_LOAD_SLACK);
        busy(&all[1], 1);
        assert_eq!(pick(&index, &all, &[], &PROMPT).upstream.id, "a");
        busy(&all[0], 2 + AFFINITY_LOAD_SLACK);
        let chosen = pick(&index, &all, &[], &PROMPT);
        assert_eq!(chosen.upstream.id, "b");
        assert_eq!(
            chosen.reason.to_string(),
            "prefix holder a busy (6 in flight); fewest in flight (1)"
        );
        busy(&all[0], 0);
        let after = pick(&index, &all, &[], &PROMPT);
        assert_eq!(after.upstream.id, "b", "the prompt is now held by b");
    }

    #[test]
    fn a_tried_or_ejected_holder_is_passed_over() {
        let all = replicas(&["a", "b", "c"]);
        let index = held_by("a", &PROMPT);
        index.record(&PROMPT[..1], &Arc::from("c"));
        let retry = pick(&index, &all, &["a".to_string()], &PROMPT);
        assert_eq!(retry.upstream.id, "c");
        assert_eq!(retry.reason.to_string(), "prefix match: 1 of 3 blocks");
        let index = held_by("a", &PROMPT);
        eject(&all[0]);
        let chosen = pick(&index, &all, &[], &PROMPT);
        assert_ne!(chosen.upstream.id, "a");
        assert_eq!(
            chosen.reason.to_string(),
            "no prefix match; fewest in flight (0)"
        );
    }

    #[test]
    fn an_ejected_holder_gets_no_affinity_even_when_every_replica_is_ejected() {
        let all = replicas(&["a", "b"]);
        let index = held_by("a", &PROMPT);
        eject(&all[0]);
        eject(&all[1]);
        busy(&all[0], 1);
        let chosen = pick(&index, &all, &[], &PROMPT);
        assert_eq!(chosen.upstream.id, "b");
        assert!(matches!(chosen.reason, Reason::NoPrefixMatch { .. }));
    }

    #[test]
    fn without_a_prompt_the_least_busy_wins_and_nothing_is_recorded() {
        let all = replicas(&["a", "b"]);
        busy(&all[0], 1);
        let index = PrefixIndex::default();
        let candidates = Candidates::new(&all, &[]);
        let chosen = PrefixAffinity::new(&index)
            .pick(&candidates, &RouteHints::default(), &mut rng(0))
            .unwrap();
        assert_eq!(chosen.upstream.id, "b");
        assert_eq!(chosen.reason.to_string(), "fewest in flight (0) of 2");
        assert!(index.longest(&PROMPT, |_| true).is_none());
    }

    #[test]
    fn nothing_is_chosen_or_recorded_when_no_candidate_is_left() {
        let all = replicas(&["a"]);
        let index = PrefixIndex::default();
        let candidates = Candidates::new(&all, &["a".to_string()]);
        let chosen = PrefixAffinity::new(&index).pick(&candidates, &prompt(&PROMPT), &mut rng(0));
        assert!(chosen.is_none());
        assert!(index.longest(&PROMPT, |_| true).is_none());
    }
}
