//! Resolve: the model asked for, the caller's right to it, and where it is
//! served: here, by a fallback model, by another region's edge
//! (spillover), or here once a pool scaled to zero has a replica again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use infermesh_runtime::discovery::Applied;
use infermesh_runtime::http::Body;
use tokio::time::Instant;

use super::{Gateway, HOP_HEADER, SPILLOVER_HEADER};
use crate::access::Principal;
use crate::access_log::AccessRecord;
use crate::error::ApiError;
use crate::quota::Ask;
use crate::request::Parsed;
use crate::table::{AdapterRoute, ColdStart, EdgeTable, ModelRoute, Upstream};

/// Where a request is served in this region.
#[derive(Clone)]
pub(crate) struct Target {
    /// The table it was resolved against.
    pub table: Arc<Applied<EdgeTable>>,
    /// The route of the model that serves it.
    pub route: Arc<ModelRoute>,
    /// The fallback model serving in place of the one asked for.
    pub fallback: Option<String>,
    /// The LoRA adapter asked for, served on the route's replicas.
    pub adapter: Option<Arc<AdapterRoute>>,
}

impl Target {
    /// The model name the engine serves the request under: the adapter's,
    /// else the model's canonical name.
    pub(crate) fn engine_model(&self) -> &str {
        self.adapter
            .as_ref()
            .map_or(self.route.model.as_str(), |a| a.name.as_str())
    }
}

/// The outcome of resolving a request.
pub(crate) enum Resolution {
    /// Served in this region.
    Here(Target),
    /// Answered by another region's edge.
    Spilled(Response<Body>),
}

impl Gateway {
    /// Resolves `request` against `table` for `principal`.
    pub(crate) async fn resolve(
        &self,
        table: Arc<Applied<EdgeTable>>,
        request: &Parsed<'_>,
        head: &http::request::Parts,
        principal: Option<&Principal>,
        record: &mut AccessRecord,
    ) -> Result<Resolution, ApiError> {
        let (route, adapter) = named(&table.table, &request.model, principal)?;
        record.adapter = adapter.as_ref().map(|a| a.name.clone());
        if !route.upstreams.is_empty() {
            return Ok(Resolution::Here(Target {
                table,
                route,
                fallback: None,
                adapter,
            }));
        }
        // A pool that scaled to zero comes back for this request, even
        // when another region or a fallback serves it meanwhile; not for a
        // caller whose quota is spent, who would be refused anyway.
        if let Some(cold) = &route.cold_start {
            if let Some(principal) = principal {
                let ask = Ask::tokens(request.prompt_tokens_estimate, request.max_output_tokens)
                    .choices(request.n)
                    .priced(route.price);
                self.limiter.peek(principal, &ask)?;
            }
            self.demand.signal(&cold.pool);
        }
        // Nothing serves the model here: its region's failover edges first
        // (once: a forwarded request is never forwarded again), then the
        // model's fallbacks served here, then a replica coming up.
        if !head.headers.contains_key(HOP_HEADER)
            && let Some(response) = self
                .spill(&table.table, head, request.body(), &route.model, record)
                .await
        {
            return Ok(Resolution::Spilled(response));
        }
        // An adapter is never swapped for another model.
        if adapter.is_none()
            && let Some(other) = fallback(&table.table, &route, principal)
        {
            tracing::debug!(model = %route.model, fallback = %other.model, "serving with a fallback model");
            let fallback = Some(other.model.clone());
            return Ok(Resolution::Here(Target {
                table,
                route: other,
                fallback,
                adapter: None,
            }));
        }
        let Some(cold) = route.cold_start.clone() else {
            return Ok(Resolution::Here(Target {
                table,
                route,
                fallback: None,
                adapter,
            }));
        };
        let _waiting = head
            .extensions
            .get::<super::keepalive::Hold>()
            .and_then(|hold| hold.waiting(request.stream));
        let (table, route) = self.wait_for_replica(&route.model, &cold).await?;
        Ok(Resolution::Here(Target {
            table,
            route,
            fallback: None,
            adapter,
        }))
    }

    /// Waits, signalling demand, until a table gives `model` a replica or
    /// the pool's cold-start timeout passes.
    async fn wait_for_replica(
        &self,
        model: &str,
        cold: &ColdStart,
    ) -> Result<(Arc<Applied<EdgeTable>>, Arc<ModelRoute>), ApiError> {
        let deadline = Instant::now() + cold.timeout;
        let mut tables = self.tables.clone();
        tracing::info!(%model, pool = %cold.pool, timeout = ?cold.timeout, "holding a request while the pool scales up from zero");
        loop {
            self.demand.signal(&cold.pool);
            if let Some(table) = tables.borrow_and_update().clone()
                && let Some(route) = table.table.route(model)
                && !route.upstreams.is_empty()
            {
                let route = route.clone();
                return Ok((table, route));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::ColdStartTimeout {
                    model: model.to_string(),
                    pool: cold.pool.clone(),
                    after: cold.timeout,
                });
            }
            // Demand records live for seconds: renew them while waiting.
            let wake = (deadline - now).min(Duration::from_secs(2));
            if let Ok(Err(_)) = tokio::time::timeout(wake, tables.changed()).await {
                return Err(ApiError::NotReady);
            }
        }
    }

    /// Forwards the request to the first failover region's edge that
    /// answers without a server error; `None` when none did.
    async fn spill(
        &self,
        table: &EdgeTable,
        parts: &http::request::Parts,
        body: &Bytes,
        model: &str,
        record: &mut AccessRecord,
    ) -> Option<Response<Body>> {
        let mut head = crate::forward::copy_parts(parts);
        let hop = http::HeaderValue::from_str(&table.region).ok()?;
        head.headers.insert(HOP_HEADER, hop);
        for peer in &table.failover {
            let edge = Arc::new(Upstream {
                id: format!("edge/{}", peer.region),
                pool: String::new(),
                authority: peer.authority.clone(),
                mesh_authority: peer.mesh_authority.clone(),
                in_flight: Arc::default(),
                health: Arc::default(),
                load: Arc::default(),
                fingerprint: String::new(),
                max_concurrency: 0,
            });
            let deadlines = self.forwarder.deadlines(None);
            match self
                .forwarder
                .forward(&head, body.clone(), edge, &deadlines)
                .await
            {
                Ok(mut response) if !response.status().is_server_error() => {
                    tracing::debug!(%model, region = %peer.region, "spilled over to another region");
                    record.endpoint = Some(format!("edge/{}", peer.region));
                    if let Some(metrics) = self.observer.metrics() {
                        metrics.spilled(model, &peer.region);
                    }
                    if let Ok(value) = http::HeaderValue::from_str(&peer.region) {
                        response.headers_mut().insert(SPILLOVER_HEADER, value);
                    }
                    return Some(response);
                }
                Ok(response) => {
                    tracing::debug!(region = %peer.region, status = %response.status(), "failover edge could not serve");
                }
                Err(failure) => {
                    tracing::debug!(region = %peer.region, error = %failure.error, "failover edge unreachable");
                }
            }
        }
        None
    }
}

/// The route of the model or adapter named `name`, for `principal`: a
/// private adapter of another tenant is as unknown as a name nobody
/// registered.
fn named(
    table: &EdgeTable,
    name: &str,
    principal: Option<&Principal>,
) -> Result<(Arc<ModelRoute>, Option<Arc<AdapterRoute>>), ApiError> {
    let not_allowed = |p: &Principal| ApiError::ModelNotAllowed {
        key: p.key.prefix.clone(),
        model: name.to_string(),
    };
    if let Some(route) = table.route(name) {
        if let Some(p) = principal.filter(|p| !p.key.allows(&route.model)) {
            return Err(not_allowed(p));
        }
        return Ok((route.clone(), None));
    }
    let adapter = table
        .adapter(name)
        .filter(|a| principal.is_none_or(|p| a.visible_to(Some(&p.key.tenant))))
        .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
    if let Some(p) = principal.filter(|p| !super::probes::usable(adapter, Some(p))) {
        return Err(not_allowed(p));
    }
    let route = table
        .route(&adapter.base)
        .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
    Ok((route.clone(), Some(adapter.clone())))
}

/// The first of `route`'s fallbacks that is served here and that
/// `principal` may use.
pub(super) fn fallback(
    table: &EdgeTable,
    route: &ModelRoute,
    principal: Option<&Principal>,
) -> Option<Arc<ModelRoute>> {
    route
        .fallbacks
        .iter()
        .filter_map(|name| table.route(name))
        .filter(|r| principal.is_none_or(|p| p.key.allows(&r.model)))
        .find(|r| !r.upstreams.is_empty())
        .cloned()
}
