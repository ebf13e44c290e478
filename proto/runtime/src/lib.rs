//! What every infermesh process shares: the discovery client that subscribes
//! to routing tables, backoff with jitter, telemetry set-up and shutdown
//! signals. Nothing process-specific belongs here.

pub mod address;
pub mod admin_token;
pub mod api_key;
pub mod backoff;
pub mod control_plane;
pub mod discovery;
pub mod engine_fields;
pub mod enroll;
pub mod fs;
pub mod http;
pub mod loans;
pub mod metrics;
pub mod money;
pub mod quota;
pub mod shutdown;
pub mod table_delta;
pub mod telemetry;
pub mod time;
pub mod tls;
