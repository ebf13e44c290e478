//! Placement of LoRA adapter requests: a replica whose engine holds the
//! adapter (as its sidecar last listed it) and is not saturated (at its
//! pool's concurrency bound, or with requests waiting in its engine), the
//! least busy of those; else the replica a load of the adapter is already
//! under way on (so concurrent first requests cause one load); else the
//! replica that holds the fewest adapters, then the least busy, which
//! loads it. A holder with free slots always wins, however busy: a load
//! costs as much as a request and evicts another adapter, and placing by
//! in-flight counts (which include requests waiting on loads) makes loads
//! beget loads. Round robin ignores residency: every turn loads on demand.

use std::sync::atomic::Ordering;

use rand::RngCore;

use super::{Balancer, Candidates, Pick, Reason, RouteHints};
use crate::replica::Upstream;

/// See the module docs.
pub struct AdapterPlacement<'a> {
    /// The adapter as sidecars list it (`name@version`).
    pub resident: &'a str,
    /// The endpoint a load of it is under way on, if any.
    pub loading: Option<&'a str>,
}

impl Balancer for AdapterPlacement<'_> {
    fn pick(
        &self,
        candidates: &Candidates<'_>,
        _hints: &RouteHints,
        _rng: &mut dyn RngCore,
    ) -> Option<Pick> {
        let in_flight = |u: &Upstream| u.in_flight.load(Ordering::Relaxed);
        let holder = candidates
            .replicas()
            .iter()
            .filter(|u| u.load.holds_adapter(self.resident) && !saturated(u))
            .min_by_key(|u| in_flight(u));
        if let Some(holder) = holder {
            return Some(Pick {
                upstream: (*holder).clone(),
                reason: Reason::AdapterResident {
                    in_flight: in_flight(holder),
                },
            });
        }
        if let Some(loading) = self.loading.and_then(|id| candidates.healthy(id)) {
            return Some(Pick {
                upstream: loading.clone(),
                reason: Reason::AdapterLoading,
            });
        }
        let best = candidates
            .replicas()
            .iter()
            .filter(|u| !u.load.holds_adapter(self.resident))
            .min_by_key(|u| (u.load.adapter_count(), in_flight(u)))
            .or_else(|| candidates.replicas().iter().min_by_key(|u| in_flight(u)))?;
        Some(Pick {
            upstream: (*best).clone(),
            reason: Reason::AdapterLoad {
                resident: best.load.adapter_count(),
                in_flight: in_flight(best),
            },
        })
    }
}

/// Whether `upstream` has no free slot: at its pool's concurrency bound,
/// or with requests waiting in its engine as it last stamped.
fn saturated(upstream: &Upstream) -> bool {
    upstream.at_bound()
        || upstream
            .load
            .fresh()
            .is_some_and(|(_, waiting, _)| waiting > 0)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{busy, replicas, rng};
    use super::*;

    fn place(all: &[std::sync::Arc<crate::replica::Upstream>], loading: Option<&str>) -> Pick {
        let placement = AdapterPlacement {
            resident: "bot@r1",
            loading,
        };
        placement
            .pick(
                &Candidates::new(all, &[]),
                &RouteHints::default(),
                &mut rng(7),
            )
            .unwrap()
    }

    #[test]
    fn a_holder_wins_until_it_is_saturated() {
        let all = replicas(&["a", "b", "c"]);
        all[1].load.update_adapters("bot@r1");
        assert_eq!(place(&all, None).upstream.id, "b");
        busy(&all[1], 20);
        assert_eq!(place(&all, None).upstream.id, "b", "busy, with free slots");
        all[1].load.update("r=8;w=2;kv=0.900");
        let pick = place(&all, None);
        assert_ne!(
            pick.upstream.id, "b",
            "requests wait in its engine: loaded elsewhere"
        );
        assert!(matches!(pick.reason, Reason::AdapterLoad { .. }));
        // A second holder with room takes it instead.
        all[2].load.update_adapters("bot@r1");
        assert_eq!(place(&all, None).upstream.id, "c");
    }

    #[test]
    fn a_new_adapter_goes_where_fewest_adapters_are_and_joins_a_load_under_way() {
        let all = replicas(&["a", "b", "c"]);
        all[0].load.update_adapters("x@1 y@1");
        all[1].load.update_adapters("x@1");
        all[2].load.update_adapters("x@1");
        busy(&all[1], 3);
        let pick = place(&all, None);
        assert_eq!(pick.upstream.id, "c", "fewest adapters, then least busy");
        assert_eq!(
            pick.reason.to_string(),
            "adapter load: 1 resident, 0 in flight"
        );
        let pick = place(&all, Some("a"));
        assert_eq!(pick.upstream.id, "a");
        assert!(matches!(pick.reason, Reason::AdapterLoading));
        // Another version is not the adapter.
        all[2].load.update_adapters("bot@r0");
        assert!(matches!(
            place(&all, None).reason,
            Reason::AdapterLoad { .. }
        ));
    }
}
