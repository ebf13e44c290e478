//! The probes (`/livez`, `/readyz`) and the model list (`/v1/models`).

use http::{Response, StatusCode};
use infermesh_runtime::http::Body;
use serde_json::json;

use super::{Gateway, json_response};
use crate::access::Principal;
use crate::error::ApiError;

impl Gateway {
    pub(super) fn readyz(&self) -> Response<Body> {
        match self.table() {
            // Lag does not make the edge unready: it still serves with the
            // table it has, and taking every edge of a region out because a
            // control plane pushed something unusable would turn a bad
            // object into an outage. The lag is reported and alerted on.
            Some(table) => json_response(
                StatusCode::OK,
                json!({"status": "ready", "table_version": table.version, "region": table.table.region,
                       "stale": table.table.from_disk,
                       "offered_version": self.sync.offered_version(),
                       "lag_seconds": self.sync.lag().as_secs_f64(),
                       "skipped_objects": table.table.skipped.len(),
                       "refused_tables": self.sync.refusals()}),
            ),
            None => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "waiting for the first routing table"}),
            ),
        }
    }

    pub(super) fn models(&self, principal: Option<&Principal>) -> Result<Response<Body>, ApiError> {
        let table = self.table().ok_or(ApiError::NotReady)?;
        // Each name a client may send, canonical names and aliases alike;
        // `root` names the model an alias stands for, as vLLM's list does.
        let data: Vec<_> = table
            .table
            .models
            .iter()
            .filter(|m| principal.is_none_or(|p| p.key.allows(&m.name)))
            .flat_map(|m| {
                std::iter::once(json!({"id": m.name, "object": "model", "created": 0,
                    "owned_by": "infermesh", "root": m.name, "parent": null, "aliases": m.aliases}))
                .chain(m.aliases.iter().map(|alias| {
                    json!({"id": alias, "object": "model", "created": 0,
                        "owned_by": "infermesh", "root": m.name, "parent": null})
                }))
            })
            .collect();
        // Adapters the caller may use, with their base model as `parent`.
        let mut adapters: Vec<_> = table
            .table
            .adapters
            .values()
            .filter(|a| usable(a, principal))
            .collect();
        adapters.sort_by(|a, b| a.name.cmp(&b.name));
        let data: Vec<_> = data
            .into_iter()
            .chain(adapters.into_iter().map(|a| {
                json!({"id": a.name, "object": "model", "created": 0, "owned_by": a.owner.as_deref().unwrap_or("infermesh"),
                    "root": a.name, "parent": a.base})
            }))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            json!({"object": "list", "data": data}),
        ))
    }
}

/// Whether `principal` may use `adapter`: its tenant may see it, and its
/// key allows the adapter or its base model.
pub(super) fn usable(adapter: &crate::table::AdapterRoute, principal: Option<&Principal>) -> bool {
    principal.is_none_or(|p| {
        adapter.visible_to(Some(&p.key.tenant))
            && (p.key.allows(&adapter.name) || p.key.allows(&adapter.base))
    })
}
