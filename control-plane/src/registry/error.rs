//! What can go wrong with an admin write, in the operator's words, and the
//! one place where it becomes a gRPC status.

use crate::store::{ObjectKind, StoreError};

/// A refused or failed registry operation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A field is malformed; `field` is its path, e.g. `pool.max_replicas`.
    #[error("{field}: {message}")]
    Invalid {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The named object does not exist.
    #[error("{} {name:?} not found", kind.noun())]
    NotFound {
        /// Kind asked for.
        kind: ObjectKind,
        /// Name asked for.
        name: String,
    },
    /// A name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller's revision is not the stored one.
    #[error(
        "{} {name:?} is at revision {current}, not {given}: get it again, reapply the change and retry",
        kind.noun()
    )]
    StaleRevision {
        /// Kind written.
        kind: ObjectKind,
        /// Name written.
        name: String,
        /// Revision the caller sent.
        given: i64,
        /// Revision stored now.
        current: i64,
    },
    /// Another object refers to this one.
    #[error("{} {name:?} is still used by {by_kind} {}: delete or change them first", kind.noun(), .by.join(", "))]
    InUse {
        /// Kind being deleted.
        kind: ObjectKind,
        /// Name being deleted.
        name: String,
        /// What refers to it.
        by_kind: &'static str,
        /// Names of the referrers.
        by: Vec<String>,
    },
    /// A field names an object that does not exist.
    #[error("{field}: {} {name:?} does not exist", kind.noun())]
    MissingReference {
        /// Path of the referring field.
        field: String,
        /// Kind referred to.
        kind: ObjectKind,
        /// Name referred to.
        name: String,
    },
    /// Concurrent writers kept changing what this write depends on.
    #[error("{} {name:?} changed concurrently too many times; retry", kind.noun())]
    Contended {
        /// Kind written.
        kind: ObjectKind,
        /// Name written.
        name: String,
    },
    /// etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Shorthand for a field error.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RegistryError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::Invalid { .. } => tonic::Status::invalid_argument(message),
            RegistryError::NotFound { .. } => tonic::Status::not_found(message),
            RegistryError::AlreadyExists(_) => tonic::Status::already_exists(message),
            RegistryError::StaleRevision { .. }
            | RegistryError::InUse { .. }
            | RegistryError::MissingReference { .. } => tonic::Status::failed_precondition(message),
            RegistryError::Contended { .. } => tonic::Status::aborted(message),
            RegistryError::Store(StoreError::Etcd(e)) => {
                tracing::warn!(error = %e, "etcd request failed");
                tonic::Status::unavailable(format!("registry store unavailable: {e}"))
            }
            RegistryError::Store(StoreError::Lease(e)) => {
                tonic::Status::unavailable(format!("registry store unavailable: {e}"))
            }
            RegistryError::Store(e @ StoreError::Contended(_)) => {
                tonic::Status::aborted(e.to_string())
            }
            RegistryError::Store(e @ StoreError::Tls(_)) => {
                tonic::Status::unavailable(format!("registry store unavailable: {e}"))
            }
            RegistryError::Store(e @ StoreError::Decode { .. }) => {
                tracing::error!(error = %e, "corrupt registry value");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
