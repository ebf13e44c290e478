//! The infermesh edge: a region's OpenAI-compatible gateway. Routes each
//! request by model to a serving replica of the local region, from the last
//! routing table the control plane pushed.

pub mod access;
pub mod access_log;
pub mod cache;
pub mod config;
pub mod error;
pub mod flow;
pub mod forward;
pub mod gateway;
pub mod health;
pub mod layers;
pub mod metrics;
pub mod openai;
pub mod prefix;
pub mod quota;
pub mod receipt;
pub mod replica;
pub mod request;
pub mod route;
pub mod server;
pub mod sse;
pub mod stack;
pub mod table;
pub mod table_store;
pub mod usage;
