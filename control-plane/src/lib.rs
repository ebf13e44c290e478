//! The infermesh control plane: the only writer of etcd. Keeps the model
//! registry and region topology, serves the admin API, pushes routing
//! tables to edges and sidecars, and takes sidecar registrations and load.

pub mod api;
pub mod auth;
pub mod autoscale;
pub mod config;
pub mod fleet;
pub mod gc;
pub mod identity;
pub mod leader;
pub mod loads;
pub mod metrics;
pub mod quota;
pub mod reclaim;
pub mod registry;
pub mod replica_lease;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod tables;
pub mod token_review;
pub mod watch_stall;
pub mod webhook;
