//! The infermesh sidecar, injected into every inference pod: registers the
//! replica with the control plane, proxies inbound traffic to the engine on
//! localhost, scrapes the engine's load and health, reports it, and drains
//! the replica on shutdown.

pub mod adapters;
pub mod assignment;
pub mod config;
pub mod drain;
pub mod engine;
pub mod gpu;
pub mod metrics;
pub mod prestop;
pub mod proxy;
pub mod report;
pub mod server;
