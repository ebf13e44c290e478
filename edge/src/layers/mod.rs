//! The tower layers of the request path, outermost first: request id, body
//! limit. Each owns one concern and is assembled in `stack.rs`.

pub mod auth;
pub mod auth_failures;
pub mod body_limit;
pub mod request_id;
