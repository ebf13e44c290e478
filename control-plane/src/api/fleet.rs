//! The fleet half of the admin API: GetFleetStatus and ListSubscribers,
//! and ExplainRoute. Validates the filters (INVALID_ARGUMENT naming the
//! field) and answers from the snapshot, the loads and the subscribers of
//! every replica, so that any replica gives the same answer, one digest
//! round apart at most. ExplainRoute asks an edge attached to this replica.

use infermesh_proto::v1::{self as pb, SubscriberRole};
use tonic::{Response, Status};

use super::admin::Admin;
use super::now_unix_ms;
use crate::fleet::{AskError, SubscriberFilter, status};
use crate::registry::validate;

/// The region filter: unset, or a region name.
fn region_filter(region: &str) -> Result<Option<String>, Status> {
    if region.is_empty() {
        return Ok(None);
    }
    validate::dns_label("region", region).map_err(Status::from)?;
    Ok(Some(region.to_string()))
}

/// The role filter: unset (both), EDGE or SIDECAR.
fn role_filter(role: i32) -> Result<Option<SubscriberRole>, Status> {
    match SubscriberRole::try_from(role) {
        Ok(SubscriberRole::Unspecified) => Ok(None),
        Ok(role @ (SubscriberRole::Edge | SubscriberRole::Sidecar)) => Ok(Some(role)),
        Err(_) => Err(Status::invalid_argument(format!(
            "role: {role} is not a subscriber role (EDGE, SIDECAR, or unset for both)"
        ))),
    }
}

/// The model an ExplainRoute request names: its `model`, else its body's.
fn explained_model(r: &pb::ExplainRouteRequest) -> Result<String, Status> {
    if r.body.is_empty() {
        if r.model.is_empty() {
            return Err(Status::invalid_argument(
                "model: required (or a body naming one)",
            ));
        }
        return Ok(r.model.clone());
    }
    let body: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&r.body)
        .map_err(|e| Status::invalid_argument(format!("body: not a JSON object: {e}")))?;
    match (r.model.as_str(), body.get("model")) {
        ("", Some(serde_json::Value::String(model))) => Ok(model.clone()),
        ("", Some(_)) => Err(Status::invalid_argument("body: model must be a string")),
        ("", None) => Err(Status::invalid_argument(
            "model: required (or a body naming one)",
        )),
        (model, _) => Ok(model.to_string()),
    }
}

/// The status for an edge's refusal to explain.
fn edge_refusal(error: String) -> Status {
    if error.starts_with("body:") || error.starts_with("session:") {
        Status::invalid_argument(error)
    } else if error.starts_with("model") {
        Status::not_found(error)
    } else {
        Status::failed_precondition(error)
    }
}

impl Admin {
    pub(super) fn do_get_fleet_status(
        &self,
        r: pb::GetFleetStatusRequest,
    ) -> Result<Response<pb::FleetStatus>, Status> {
        let region = region_filter(&r.region)?;
        let snapshot = self.snapshot()?;
        let now = now_unix_ms();
        let regions = status::regions(&snapshot, region.as_deref(), |id| self.loads.get(id), now);
        let filter = SubscriberFilter { role: None, region };
        let listed = self.subscribers.list(&filter, now);
        Ok(Response::new(pb::FleetStatus {
            regions,
            subscribers: listed.subscribers,
            control_planes: listed.control_planes,
            subscribers_left_out: listed.left_out,
            answered_by: self.subscribers.node().to_string(),
            version: u64::try_from(snapshot.revision).unwrap_or(0),
            budgets: self
                .quotas
                .as_ref()
                .map(|q| q.budgets(&snapshot, now))
                .unwrap_or_default(),
        }))
    }

    pub(super) fn do_list_subscribers(
        &self,
        r: pb::ListSubscribersRequest,
    ) -> Result<Response<pb::ListSubscribersResponse>, Status> {
        let filter = SubscriberFilter {
            role: role_filter(r.role)?,
            region: region_filter(&r.region)?,
        };
        let listed = self.subscribers.list(&filter, now_unix_ms());
        Ok(Response::new(pb::ListSubscribersResponse {
            subscribers: listed.subscribers,
            control_planes: listed.control_planes,
            subscribers_left_out: listed.left_out,
        }))
    }
}

impl Admin {
    pub(super) async fn do_explain_route(
        &self,
        r: pb::ExplainRouteRequest,
    ) -> Result<Response<pb::RouteExplanation>, Status> {
        validate::dns_label("region", &r.region).map_err(Status::from)?;
        let model = explained_model(&r)?;
        if r.edge.len() > 253 {
            return Err(Status::invalid_argument("edge: at most 253 characters"));
        }
        let snapshot = self.snapshot()?;
        if !snapshot.regions.contains_key(&r.region) {
            return Err(Status::not_found(format!(
                "region {:?} not found",
                r.region
            )));
        }
        let known = snapshot
            .models
            .values()
            .any(|m| m.name == model || m.aliases.contains(&model));
        if !known {
            return Err(Status::not_found(format!(
                "model {model:?} not found (no model or alias of that name)"
            )));
        }
        let edge = (!r.edge.is_empty()).then_some(r.edge.as_str());
        let query = pb::ExplainQuery {
            id: 0,
            model: r.model,
            prompt: r.prompt,
            session: r.session,
            body: r.body,
        };
        let answer = match self.explain.ask(&r.region, edge, query).await {
            Ok(answer) => answer,
            Err(error) => return Err(self.ask_failed(&r.region, error)),
        };
        match answer.explanation {
            Some(explanation) => Ok(Response::new(explanation)),
            None => Err(edge_refusal(answer.error)),
        }
    }

    /// The status for a question no edge answered; when the region's edges
    /// are attached to other replicas, it names them.
    fn ask_failed(&self, region: &str, error: AskError) -> Status {
        let message = error.to_string();
        match error {
            AskError::NoEdge(_) | AskError::NoSuchEdge { .. } => {
                let filter = SubscriberFilter {
                    role: Some(SubscriberRole::Edge),
                    region: Some(region.to_string()),
                };
                let elsewhere: Vec<String> = self
                    .subscribers
                    .list(&filter, now_unix_ms())
                    .subscribers
                    .into_iter()
                    .map(|s| format!("{} on {}", s.node_id, s.control_plane))
                    .collect();
                if elsewhere.is_empty() {
                    Status::failed_precondition(format!(
                        "{message}; no edge of the region is subscribed to any replica"
                    ))
                } else {
                    Status::failed_precondition(format!(
                        "{message}; ask the replica an edge is attached to: {}",
                        elsewhere.join(", ")
                    ))
                }
            }
            AskError::Busy(_) => Status::resource_exhausted(message),
            AskError::Timeout(_) => Status::deadline_exceeded(message),
            AskError::Gone(_) => Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain(model: &str, body: &str) -> pb::ExplainRouteRequest {
        pb::ExplainRouteRequest {
            model: model.into(),
            region: "eu".into(),
            body: body.into(),
            ..Default::default()
        }
    }

    #[test]
    fn explain_takes_the_model_from_the_request_or_its_body() {
        assert_eq!(explained_model(&explain("llama", "")).unwrap(), "llama");
        let body = r#"{"model":"l3","messages":[]}"#;
        assert_eq!(explained_model(&explain("", body)).unwrap(), "l3");
        assert_eq!(explained_model(&explain("llama", "{}")).unwrap(), "llama");
        assert_eq!(explained_model(&explain("llama", body)).unwrap(), "llama");
        for (model, body, field) in [
            ("", "", "model:"),
            ("", "[1]", "body:"),
            ("", "{", "body:"),
            ("", r#"{"model":7}"#, "body:"),
            ("", r#"{"prompt":"hi"}"#, "model:"),
        ] {
            let status = explained_model(&explain(model, body)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{body}");
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }

    #[test]
    fn an_edge_refusal_maps_to_the_status_it_means() {
        let code = |e: &str| edge_refusal(e.to_string()).code();
        assert_eq!(code("body: missing field"), tonic::Code::InvalidArgument);
        assert_eq!(
            code("session: must be printable ASCII"),
            tonic::Code::InvalidArgument
        );
        assert_eq!(code("model \"x\" is not served"), tonic::Code::NotFound);
        assert_eq!(
            code("no routing table applied yet"),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn an_unknown_role_is_refused_naming_the_field() {
        let status = role_filter(7).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("role:"),
            "{}",
            status.message()
        );
        assert_eq!(role_filter(0).unwrap(), None);
        assert_eq!(role_filter(2).unwrap(), Some(SubscriberRole::Sidecar));
    }

    #[test]
    fn a_region_that_is_not_a_name_is_refused_naming_the_field() {
        let status = region_filter("EU West").unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("region"), "{}", status.message());
        assert_eq!(region_filter("").unwrap(), None);
        assert_eq!(
            region_filter("eu-west").unwrap().as_deref(),
            Some("eu-west")
        );
    }
}
