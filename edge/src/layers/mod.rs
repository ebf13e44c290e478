//! The tower layers of the request path, outermost first: request id, body
//! limit. Each owns one concern and is assembled in `stack.rs`. In front of
//! the mesh listener, `edges_only` lets only peer edges in.

pub mod auth;
pub mod auth_failures;
pub mod body_limit;
pub mod catch_panic;
pub mod edges_only;
pub mod request_id;
