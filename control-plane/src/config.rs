//! Command-line and environment configuration of the control plane,
//! validated once at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// infermesh control plane: registry in etcd, admin API, routing-table and load-report streams.
#[derive(Debug, Clone, Parser)]
#[command(name = "infermesh-control-plane", version)]
pub struct Config {
    /// Address of the gRPC server (admin, discovery, load reports, health, reflection).
    #[arg(long, env = "INFERMESH_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,

    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "INFERMESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix under which every object is stored.
    #[arg(long, env = "INFERMESH_ETCD_PREFIX", default_value = "/infermesh/")]
    pub etcd_prefix: String,

    /// Seconds a replica stays in the tables after its sidecar's stream ends unannounced.
    #[arg(
        long,
        env = "INFERMESH_ENDPOINT_LEASE_TTL_SECONDS",
        default_value_t = 5
    )]
    pub endpoint_lease_ttl_seconds: u32,

    /// How often sidecars report load, milliseconds.
    #[arg(long, env = "INFERMESH_REPORT_INTERVAL_MS", default_value_t = 1000)]
    pub report_interval_ms: u32,
}

impl Config {
    /// Checks values clap cannot, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--etcd-endpoints: at least one endpoint is required".into());
        }
        if !self.etcd_prefix.starts_with('/') {
            return Err(format!(
                "--etcd-prefix: {:?} must start with '/'",
                self.etcd_prefix
            ));
        }
        if !(2..=300).contains(&self.endpoint_lease_ttl_seconds) {
            return Err(format!(
                "--endpoint-lease-ttl-seconds: {} is outside 2..=300",
                self.endpoint_lease_ttl_seconds
            ));
        }
        if !(100..=60_000).contains(&self.report_interval_ms) {
            return Err(format!(
                "--report-interval-ms: {} is outside 100..=60000",
                self.report_interval_ms
            ));
        }
        Ok(())
    }

    /// The report interval as a duration.
    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.report_interval_ms))
    }
}
