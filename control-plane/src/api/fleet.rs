//! The fleet half of the admin API: GetFleetStatus and ListSubscribers.
//! Validates the filters (INVALID_ARGUMENT naming the field) and answers
//! from the snapshot, the loads and the subscribers of every replica, so
//! that any replica gives the same answer, one digest round apart at most.

use infermesh_proto::v1::{self as pb, SubscriberRole};
use tonic::{Response, Status};

use super::admin::Admin;
use super::now_unix_ms;
use crate::fleet::{SubscriberFilter, status};
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

#[cfg(test)]
mod tests {
    use super::*;

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
