//! Pick: what the request tells the model's policy (prompt blocks for
//! prefix affinity, the session for session affinity) and the first
//! replica chosen, traced with the policy's reason.

use std::sync::Arc;

use super::SESSION_HEADER;
use super::resolve::Target;
use crate::error::ApiError;
use crate::request::Parsed;
use crate::table::{Policy, RouteHints, Upstream};

/// The hints the model's policy reads; only its own are computed.
pub(crate) fn hints(policy: Policy, request: &Parsed<'_>, headers: &http::HeaderMap) -> RouteHints {
    RouteHints {
        prefix: (policy == Policy::PrefixAffinity)
            .then(|| crate::prefix::block_keys(&request.prompt.text())),
        session: (policy == Policy::SessionAffinity)
            .then(|| session_of(headers, request))
            .flatten(),
    }
}

/// The session of a request: its session header, else the body's `user`.
fn session_of(headers: &http::HeaderMap, request: &Parsed<'_>) -> Option<String> {
    headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .or_else(|| request.user.clone())
}

/// The first replica for the request, in a `route` span naming the
/// policy, the candidates and the reason for the choice.
pub(crate) fn first(target: &Target, hints: &RouteHints) -> Result<Arc<Upstream>, ApiError> {
    let route = &target.route;
    let span = tracing::info_span!(
        "route",
        otel.name = "route",
        infermesh.model = %route.model,
        infermesh.policy = route.policy.as_str(),
        infermesh.candidates = route.upstreams.len(),
        infermesh.table_version = target.table.version,
        infermesh.endpoint = tracing::field::Empty,
        infermesh.reason = tracing::field::Empty,
    );
    let _entered = span.enter();
    match route.choose(hints, &[]) {
        Some((chosen, reason)) => {
            span.record("infermesh.endpoint", chosen.id.as_str());
            span.record("infermesh.reason", tracing::field::display(&reason));
            tracing::debug!(model = %route.model, endpoint = %chosen.id, "routing");
            Ok(chosen)
        }
        None => {
            span.record("infermesh.reason", "no serving replica in this region");
            Err(ApiError::NoHealthyReplica(route.model.clone()))
        }
    }
}
