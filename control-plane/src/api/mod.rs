//! The gRPC services: admin (operators), discovery (routing-table streams to
//! edges and sidecars) and load reports (sidecar registration and load).

mod access;
pub mod admin;
pub mod discovery;
mod fleet;
pub mod load_reports;

use std::time::Duration;

/// How long a new stream may take to send its first message.
pub const FIRST_MESSAGE_DEADLINE: Duration = Duration::from_secs(10);

/// Waits for the first message of a client stream, with a deadline.
pub async fn first_message<T>(
    inbound: &mut tonic::Streaming<T>,
    what: &str,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(FIRST_MESSAGE_DEADLINE, inbound.message()).await {
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no {what} within {FIRST_MESSAGE_DEADLINE:?} of opening the stream"
        ))),
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => Err(tonic::Status::invalid_argument(format!(
            "stream closed before {what}"
        ))),
        Ok(Ok(Some(message))) => Ok(message),
    }
}

pub use infermesh_runtime::time::now_unix_ms;
