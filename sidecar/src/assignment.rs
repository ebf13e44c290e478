//! The sidecar's routing table: how edges currently see this replica. Used
//! on shutdown to know when edges have stopped choosing it.

use infermesh_proto::v1::{EndpointState, RoutingTable};
use infermesh_runtime::discovery::ApplyTable;

/// This replica as the control plane last pushed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Registered and in the tables.
    pub listed: bool,
    /// Its state there.
    pub state: EndpointState,
}

/// Reads this replica's entry out of sidecar tables.
pub struct AssignmentReader {
    /// This replica's endpoint id.
    pub endpoint_id: String,
}

impl ApplyTable for AssignmentReader {
    type Table = Assignment;
    type Error = String;

    fn apply(&mut self, table: RoutingTable) -> Result<Assignment, String> {
        match table.endpoints.iter().find(|e| e.id == self.endpoint_id) {
            Some(endpoint) => Ok(Assignment {
                listed: true,
                state: EndpointState::try_from(endpoint.state).map_err(|_| {
                    format!(
                        "endpoint {:?}: unknown state {}",
                        endpoint.id, endpoint.state
                    )
                })?,
            }),
            None if table.endpoints.is_empty() => Ok(Assignment {
                listed: false,
                state: EndpointState::Unspecified,
            }),
            None => Err(format!(
                "sidecar table holds other endpoints but not {:?}",
                self.endpoint_id
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::Endpoint;

    #[test]
    fn own_state_is_read_and_a_foreign_table_refused() {
        let mut reader = AssignmentReader {
            endpoint_id: "me".into(),
        };
        let table = |id: &str, state: EndpointState| RoutingTable {
            endpoints: vec![Endpoint {
                id: id.into(),
                state: state as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            reader.apply(table("me", EndpointState::Draining)).unwrap(),
            Assignment {
                listed: true,
                state: EndpointState::Draining
            }
        );
        assert!(!reader.apply(RoutingTable::default()).unwrap().listed);
        assert!(
            reader
                .apply(table("other", EndpointState::Serving))
                .is_err()
        );
    }
}
