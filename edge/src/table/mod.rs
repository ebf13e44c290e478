//! The edge's routing table: what a pushed `RoutingTable` means to the
//! request path (routes by model name, the replicas and their live
//! counters). Building it from a push, and leaving out objects that cannot
//! be used, is `build`'s job; choosing a replica for a request is
//! `crate::route`'s.

use rand::RngCore;
use std::collections::HashMap;
use std::sync::Arc;

use http::uri::Authority;

use crate::access::Access;
use crate::prefix::PrefixIndex;
use crate::route::{self, Balancer, RoundRobin};

pub(crate) mod build;
pub(crate) mod skips;

pub use crate::replica::{LoadSample, Upstream};
pub use crate::route::{Policy, RouteHints};
pub use build::EdgeTableBuilder;
pub use skips::{ObjectKind, Skipped};

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
    /// What its tokens cost, for spend budgets.
    pub price: infermesh_runtime::money::Price,
    /// Engine-specific request fields clients may send for it.
    pub engine_fields: infermesh_runtime::engine_fields::FieldSet,
    /// A pool of this region that scales to zero: requests wait for it.
    pub cold_start: Option<ColdStart>,
    /// Whose turn it is under round robin.
    pub(crate) turns: RoundRobin,
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

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone)]
pub struct ListedModel {
    /// Canonical name.
    pub name: String,
    /// Other accepted names.
    pub aliases: Vec<String>,
}

/// A LoRA adapter served on a base model's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRoute {
    /// What clients ask for.
    pub name: String,
    /// The model whose route serves it.
    pub base: String,
    /// Its registered version.
    pub version: String,
    /// The only tenant whose keys may use it, when private.
    pub owner: Option<String>,
    /// How a sidecar lists it once loaded: `name@version`.
    pub resident: String,
}

impl AdapterRoute {
    /// Whether keys of `tenant` may use it.
    pub fn visible_to(&self, tenant: Option<&str>) -> bool {
        self.owner.is_none() || self.owner.as_deref() == tenant
    }
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
    /// Whether any model has a cache policy (requests are then read whole,
    /// for their cache material).
    pub caching: bool,
    /// LoRA adapters whose base model routes here, by name.
    pub adapters: HashMap<String, Arc<AdapterRoute>>,
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

    /// The adapter named `name`, if one is served here.
    pub fn adapter(&self, name: &str) -> Option<&Arc<AdapterRoute>> {
        self.adapters.get(name)
    }
}

impl ModelRoute {
    /// The replica for an attempt under the model's policy, and why;
    /// `None` when every replica was tried or none is serving.
    pub fn choose(
        &self,
        hints: &RouteHints,
        tried: &[String],
    ) -> Option<(Arc<Upstream>, route::Reason)> {
        self.choose_with(hints, tried, &mut rand::rng())
    }

    /// `choose` drawing its randomness from `rng`.
    pub fn choose_with(
        &self,
        hints: &RouteHints,
        tried: &[String],
        rng: &mut dyn RngCore,
    ) -> Option<(Arc<Upstream>, route::Reason)> {
        let candidates = route::Candidates::new(&self.upstreams, tried);
        let pick = match self.policy {
            Policy::LeastOutstanding => route::LeastOutstanding.pick(&candidates, hints, rng),
            Policy::RoundRobin => self.turns.pick(&candidates, hints, rng),
            Policy::PrefixAffinity => {
                route::PrefixAffinity::new(&self.prefixes).pick(&candidates, hints, rng)
            }
            Policy::LeastLoad => route::LeastLoad.pick(&candidates, hints, rng),
            Policy::SessionAffinity => route::SessionAffinity.pick(&candidates, hints, rng),
        }?;
        Some((pick.upstream, pick.reason))
    }

    /// The replica a first attempt would go to now, and why, changing no
    /// state: round robin's turn is not taken and prefix affinity records
    /// nothing.
    pub fn preview(
        &self,
        hints: &RouteHints,
        rng: &mut dyn RngCore,
    ) -> Option<(Arc<Upstream>, route::Reason)> {
        let candidates = route::Candidates::new(&self.upstreams, &[]);
        let pick = match self.policy {
            Policy::RoundRobin => self.turns.peek().pick(&candidates, hints, rng),
            Policy::PrefixAffinity => {
                route::PrefixAffinity::preview(&self.prefixes).pick(&candidates, hints, rng)
            }
            _ => return self.choose_with(hints, &[], rng),
        }?;
        Some((pick.upstream, pick.reason))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use infermesh_proto::v1::{Endpoint, EndpointState, Model, Pool, RoutingTable};
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
            let (chosen, _) = route.choose(&RouteHints::default(), &[]).unwrap();
            assert_eq!(chosen.id, "b");
        }
        let second = builder.apply(table(&eps)).unwrap();
        let a = &second.route("llama").unwrap().upstreams[0];
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn adapters_route_on_their_base_model_and_unusable_ones_are_skipped() {
        let mut pushed = table(&[("a", "127.0.0.1:1000", EndpointState::Serving)]);
        let adapter = |name: &str, base: &str, owner: &str| infermesh_proto::v1::Adapter {
            name: name.into(),
            base_model: base.into(),
            source: format!("/adapters/{name}"),
            version: "r1".into(),
            owner_tenant: owner.into(),
            ..Default::default()
        };
        pushed.adapters = vec![
            adapter("bot", "llama", ""),
            adapter("private-bot", "llama", "acme"),
            adapter("on-alias", "l3", ""),
            adapter("orphan", "gone", ""),
            adapter("l3", "llama", ""),
        ];
        let t = EdgeTableBuilder::default().apply(pushed).unwrap();
        let bot = t.adapter("bot").expect("routed");
        assert_eq!(
            (bot.base.as_str(), bot.resident.as_str()),
            ("llama", "bot@r1")
        );
        assert!(t.route(&bot.base).is_some());
        assert!(bot.visible_to(Some("anyone")));
        let private = t.adapter("private-bot").unwrap();
        assert!(private.visible_to(Some("acme")) && !private.visible_to(Some("other")));
        for skipped in ["on-alias", "orphan", "l3"] {
            assert!(t.adapter(skipped).is_none(), "{skipped}");
            assert!(
                t.skipped.iter().any(|s| s.to_string().contains(skipped)),
                "{skipped}: {:?}",
                t.skipped
            );
        }
    }
}
