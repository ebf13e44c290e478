//! The sidecar's routing table: how edges currently see this replica. Used
//! on shutdown to know when edges have stopped choosing it.

use infermesh_proto::v1::{Adapter, EndpointState, RoutingTable};
use infermesh_runtime::discovery::ApplyTable;

/// This replica as the control plane last pushed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Registered and in the tables.
    pub listed: bool,
    /// Its state there.
    pub state: EndpointState,
    /// The registry's LoRA adapters on its model.
    pub adapters: Vec<Adapter>,
}

/// Why a sidecar table cannot say how edges see this replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    /// This replica's entry has a state this build does not know.
    #[error("endpoint {endpoint:?}: unknown state {state}")]
    UnknownState {
        /// The endpoint id.
        endpoint: String,
        /// The state's wire value.
        state: i32,
    },
    /// The table lists endpoints, but not this replica.
    #[error("sidecar table holds other endpoints but not {endpoint_id:?}")]
    NotListed {
        /// This replica's endpoint id.
        endpoint_id: String,
    },
}

/// Reads this replica's entry out of sidecar tables.
pub struct AssignmentReader {
    /// This replica's endpoint id.
    pub endpoint_id: String,
}

impl AssignmentReader {
    /// This replica's entry in `table`.
    pub fn read(&self, table: &RoutingTable) -> Result<Assignment, AssignmentError> {
        match table.endpoints.iter().find(|e| e.id == self.endpoint_id) {
            Some(endpoint) => Ok(Assignment {
                listed: true,
                state: EndpointState::try_from(endpoint.state).map_err(|_| {
                    AssignmentError::UnknownState {
                        endpoint: endpoint.id.clone(),
                        state: endpoint.state,
                    }
                })?,
                adapters: table.adapters.clone(),
            }),
            None if table.endpoints.is_empty() => Ok(Assignment {
                listed: false,
                state: EndpointState::Unspecified,
                adapters: Vec::new(),
            }),
            None => Err(AssignmentError::NotListed {
                endpoint_id: self.endpoint_id.clone(),
            }),
        }
    }
}

impl ApplyTable for AssignmentReader {
    type Table = Assignment;
    type Error = AssignmentError;

    fn apply(&mut self, table: RoutingTable) -> Result<Assignment, AssignmentError> {
        self.read(&table)
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
                state: EndpointState::Draining,
                adapters: Vec::new(),
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
