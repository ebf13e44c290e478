//! Placing a LoRA adapter request: a replica holding the adapter, one a
//! load is under way on, or one that loads it (`route::AdapterPlacement`).
//! A load this edge starts is remembered until its replica answers, so
//! that concurrent first requests for the adapter go to the same replica
//! and its sidecar loads it once.

use std::sync::Arc;

use dashmap::DashMap;

use super::Gateway;
use super::resolve::Target;
use crate::error::ApiError;
use crate::route::{AdapterPlacement, Balancer, Candidates, Reason, RouteHints};
use crate::table::{AdapterRoute, ModelRoute, Policy, Upstream};

/// Loads of adapters this edge has under way: `name@version` → endpoint.
#[derive(Debug, Default)]
pub(crate) struct Loading(DashMap<String, String>);

/// Forgets a load once its replica answered (dropped after the attempt).
#[derive(Debug)]
pub(crate) struct LoadUnderWay {
    loading: Arc<Loading>,
    adapter: String,
    endpoint: String,
}

impl Drop for LoadUnderWay {
    fn drop(&mut self) {
        self.loading
            .0
            .remove_if(&self.adapter, |_, endpoint| *endpoint == self.endpoint);
    }
}

/// The metric label of a placement on `upstream`.
fn placement(upstream: &Upstream, adapter: &AdapterRoute, reason: &Reason) -> &'static str {
    if upstream.load.holds_adapter(&adapter.resident) {
        "resident"
    } else if matches!(reason, Reason::AdapterLoading) {
        "loading"
    } else {
        "load"
    }
}

impl Gateway {
    /// The replica for a request of `target`'s adapter, not one of
    /// `tried`; the load it starts, if it starts one.
    pub(crate) fn place_adapter(
        &self,
        target: &Target,
        adapter: &AdapterRoute,
        tried: &[String],
    ) -> Result<(Arc<Upstream>, Option<LoadUnderWay>), ApiError> {
        let route = &target.route;
        let (upstream, reason) = place(route, adapter, tried, &self.loading)
            .ok_or_else(|| ApiError::NoHealthyReplica(route.model.clone()))?;
        tracing::debug!(adapter = %adapter.name, endpoint = %upstream.id, %reason, "adapter placed");
        if let Some(metrics) = self.observer.metrics() {
            metrics.adapter_placed(
                &route.model,
                &adapter.name,
                placement(&upstream, adapter, &reason),
            );
        }
        let load = matches!(reason, Reason::AdapterLoad { .. }).then(|| {
            self.loading
                .0
                .insert(adapter.resident.clone(), upstream.id.clone());
            LoadUnderWay {
                loading: self.loading.clone(),
                adapter: adapter.resident.clone(),
                endpoint: upstream.id.clone(),
            }
        });
        Ok((upstream, load))
    }

    /// Counts a request whose adapter no replica could load.
    pub(crate) fn adapter_failed(&self, route: &ModelRoute, adapter: &AdapterRoute) {
        if let Some(metrics) = self.observer.metrics() {
            metrics.adapter_placed(&route.model, &adapter.name, "load_failed");
        }
    }
}

/// Where a request for `adapter` goes on `route`, and why. Round robin
/// takes turns whatever is resident, and the replica loads on demand.
pub(crate) fn place(
    route: &ModelRoute,
    adapter: &AdapterRoute,
    tried: &[String],
    loading: &Loading,
) -> Option<(Arc<Upstream>, Reason)> {
    if route.policy == Policy::RoundRobin {
        return route.choose(&RouteHints::default(), tried);
    }
    let under_way = loading.0.get(&adapter.resident).map(|e| e.value().clone());
    let placement = AdapterPlacement {
        resident: &adapter.resident,
        loading: under_way.as_deref(),
    };
    let candidates = Candidates::new(&route.upstreams, tried);
    let pick = placement.pick(&candidates, &RouteHints::default(), &mut rand::rng())?;
    Some((pick.upstream, pick.reason))
}
