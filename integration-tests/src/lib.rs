//! A harness that reads like the scenarios it runs: start real etcd, the
//! control plane, edges, sidecars and simulated engines as real processes
//! on free loopback ports, drive the admin API with the real `grpcurl`, and
//! talk HTTP to the edge. Every process is killed when its handle drops,
//! also when a test fails, and its log is printed then.

pub mod bench;
pub mod binaries;
pub mod client;
pub mod etcd;
pub mod grpcurl;
pub mod kube;
pub mod load;
pub mod mesh;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod redis;
pub mod scrape;
pub mod wait;
