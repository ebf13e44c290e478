//! Command-line and environment configuration of the sidecar. In
//! Kubernetes the injected container sets these from the pod's labels.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::Uri;
use infermesh_runtime::control_plane::ControlPlaneTlsArgs;
use infermesh_runtime::enroll::EnrollArgs;
use infermesh_runtime::tls::mesh::MeshTls;

use crate::engine::EngineKind;

/// infermesh sidecar: registers this pod's replica, proxies to its engine, reports load.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "infermesh-sidecar",
    version,
    after_help = "As the pod's preStop hook: infermesh-sidecar --prestop-hook SOCKET asks the sidecar serving --prestop-socket SOCKET to drain and returns once it has."
)]
pub struct Config {
    /// Address of the inbound proxy edges send requests to.
    #[arg(long, env = "INFERMESH_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,

    /// Address of the Prometheus metrics listener (GET /metrics).
    #[arg(long, env = "INFERMESH_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    pub metrics_listen: SocketAddr,

    /// Read GPU utilisation and memory through NVML (a pod without a GPU or
    /// without the library reports it unavailable and keeps working).
    #[arg(
        long,
        env = "INFERMESH_GPU_TELEMETRY",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub gpu_telemetry: bool,

    /// Path of the NVML library (default: the loader's libnvidia-ml.so.1).
    #[arg(long, env = "INFERMESH_NVML_LIBRARY")]
    pub nvml_library: Option<std::path::PathBuf>,

    /// host:port edges use to reach this sidecar (defaults to $POD_IP with the listen port).
    #[arg(long, env = "INFERMESH_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Base URL of the engine on localhost.
    #[arg(
        long,
        env = "INFERMESH_ENGINE_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub engine_url: Uri,

    /// Engine family, which picks the metric names read.
    #[arg(long, env = "INFERMESH_ENGINE", value_enum, default_value = "vllm")]
    pub engine: EngineKind,

    /// Unique id of this replica (defaults to $HOSTNAME, the pod name).
    #[arg(long, env = "INFERMESH_ENDPOINT_ID")]
    pub endpoint_id: Option<String>,

    /// Pool this replica belongs to.
    #[arg(long, env = "INFERMESH_POOL")]
    pub pool: String,

    /// Model this replica serves.
    #[arg(long, env = "INFERMESH_MODEL")]
    pub model: String,

    /// Revision of the model's weights the engine serves (e.g. the Hugging
    /// Face commit); part of the engine fingerprint.
    #[arg(long, env = "INFERMESH_MODEL_REVISION", default_value = "")]
    pub model_revision: String,

    /// Tokenizer the engine uses, when not the model's own; part of the fingerprint.
    #[arg(long, env = "INFERMESH_TOKENIZER", default_value = "")]
    pub tokenizer: String,

    /// Hash of the chat template the engine applies; part of the fingerprint.
    #[arg(long, env = "INFERMESH_CHAT_TEMPLATE_HASH", default_value = "")]
    pub chat_template_hash: String,

    /// Region of this replica.
    #[arg(long, env = "INFERMESH_REGION")]
    pub region: String,

    /// Availability zone of this replica.
    #[arg(long, env = "INFERMESH_ZONE", default_value = "")]
    pub zone: String,

    /// Control-plane addresses, comma-separated.
    #[arg(
        long,
        env = "INFERMESH_CONTROL_PLANE",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    pub control_plane: Vec<String>,

    /// TLS to the control plane (its CA, and the client identity for mutual TLS).
    #[command(flatten)]
    pub control_plane_tls: ControlPlaneTlsArgs,

    /// Getting and renewing an identity issued by the control plane.
    #[command(flatten)]
    pub enroll: EnrollArgs,

    /// How edges reach this sidecar. `mutual`: HTTPS with this sidecar's
    /// identity (--control-plane-cert, reloaded when renewed), and only
    /// callers with an edge certificate from the mesh CA get past /livez
    /// and /readyz. `off`: plain HTTP open to anyone who can reach the
    /// port.
    #[arg(
        long,
        env = "INFERMESH_SERVE_TLS",
        value_enum,
        default_value = "mutual"
    )]
    pub serve_tls: MeshTls,

    /// LoRA adapters resident in the engine at most; loading one more
    /// unloads the least recently used one no request is using.
    #[arg(long, env = "INFERMESH_MAX_ADAPTERS", default_value_t = 8)]
    pub max_adapters: usize,
    /// How often the engine is scraped and load reported, milliseconds.
    #[arg(long, env = "INFERMESH_SCRAPE_INTERVAL_MS", default_value_t = 1000)]
    pub scrape_interval_ms: u64,

    /// Deadline of one scrape or health probe, milliseconds.
    #[arg(long, env = "INFERMESH_SCRAPE_TIMEOUT_MS", default_value_t = 800)]
    pub scrape_timeout_ms: u64,

    /// On shutdown, longest wait for edges to stop sending before the listener closes, seconds.
    #[arg(long, env = "INFERMESH_DRAIN_WAIT_SECONDS", default_value_t = 10)]
    pub drain_wait_seconds: u64,

    /// Time given to in-flight requests after the listener closes, seconds.
    #[arg(long, env = "INFERMESH_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,

    /// Unix socket (in a volume the pod's containers share) where the
    /// preStop hook asks for the drain; the `drained` marker is written
    /// beside it. Unset: no hook. The network port never serves /prestop.
    #[arg(long, env = "INFERMESH_PRESTOP_SOCKET")]
    pub prestop_socket: Option<std::path::PathBuf>,

    /// A request's whole body must arrive within this time of its head
    /// (e.g. `30s`); a slower upload is cut and its connection closed.
    #[arg(long, env = "INFERMESH_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: std::time::Duration,
}

/// A flag, or a combination of flags, that cannot work; the text names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No endpoint id and no host name to default to.
    #[error("--endpoint-id: required (or set $HOSTNAME)")]
    NoEndpointId,
    /// $POD_IP is not an IP address.
    #[error("$POD_IP {ip:?}: {source}")]
    PodIp {
        /// The value of $POD_IP.
        ip: String,
        /// What the parser said.
        source: std::net::AddrParseError,
    },
    /// Nothing says which address edges should use.
    #[error(
        "--advertise-address: required when --listen is a wildcard address and $POD_IP is unset"
    )]
    NoAdvertiseAddress,
    /// A zero body timeout.
    #[error("--body-timeout: must be positive")]
    BodyTimeout,
    /// The TLS or enrolment flags for the control plane do not fit together.
    #[error("{0}")]
    ControlPlane(String),
    /// Mutual TLS to edges without a certificate to serve.
    #[error("--serve-tls mutual: {0} (or --serve-tls off)")]
    MutualWithoutIdentity(String),
    /// A required flag is empty.
    #[error("{flag}: required")]
    Required {
        /// The flag.
        flag: &'static str,
    },
    /// The engine URL is not `http://host:port`.
    #[error("--engine-url: {0} must be http://host:port")]
    EngineUrl(Uri),
    /// The scrape interval is too short.
    #[error("--scrape-interval-ms: must be at least 100")]
    ScrapeInterval,
    /// The scrape timeout is zero or longer than the interval.
    #[error("--scrape-timeout-ms: must be positive and at most --scrape-interval-ms")]
    ScrapeTimeout,
    /// No adapter could ever be resident.
    #[error("--max-adapters: must be at least 1")]
    MaxAdapters,
}

impl Config {
    /// The endpoint id in use.
    pub fn endpoint_id(&self) -> Result<String, ConfigError> {
        self.endpoint_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|id| !id.is_empty())
            .ok_or(ConfigError::NoEndpointId)
    }

    /// The address edges are told to use.
    pub fn advertise_address(&self) -> Result<String, ConfigError> {
        if let Some(address) = self.advertise_address.clone().filter(|a| !a.is_empty()) {
            return Ok(address);
        }
        if let Ok(ip) = std::env::var("POD_IP")
            && !ip.is_empty()
        {
            return Ok(SocketAddr::new(
                ip.parse().map_err(|source| ConfigError::PodIp {
                    ip: ip.clone(),
                    source,
                })?,
                self.listen.port(),
            )
            .to_string());
        }
        if self.listen.ip().is_unspecified() {
            return Err(ConfigError::NoAdvertiseAddress);
        }
        Ok(self.listen.to_string())
    }

    /// Checks values clap cannot, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.endpoint_id()?;
        if self.body_timeout.is_zero() {
            return Err(ConfigError::BodyTimeout);
        }
        if self.max_adapters == 0 {
            return Err(ConfigError::MaxAdapters);
        }
        self.control_plane_tls
            .client()
            .map_err(|e| ConfigError::ControlPlane(e.to_string()))?;
        self.enroll
            .check(&self.control_plane_tls)
            .map_err(|e| ConfigError::ControlPlane(e.to_string()))?;
        if self.serve_tls == MeshTls::Mutual && self.enroll.identity_dir.is_none() {
            self.control_plane_tls
                .identity_files()
                .map_err(|e| ConfigError::MutualWithoutIdentity(e.to_string()))?;
        }
        self.advertise_address()?;
        for (flag, value) in [
            ("--pool", &self.pool),
            ("--model", &self.model),
            ("--region", &self.region),
        ] {
            if value.is_empty() {
                return Err(ConfigError::Required { flag });
            }
        }
        if self.engine_url.scheme_str() != Some("http") || self.engine_url.authority().is_none() {
            return Err(ConfigError::EngineUrl(self.engine_url.clone()));
        }
        if self.scrape_interval_ms < 100 {
            return Err(ConfigError::ScrapeInterval);
        }
        if self.scrape_timeout_ms == 0 || self.scrape_timeout_ms > self.scrape_interval_ms {
            return Err(ConfigError::ScrapeTimeout);
        }
        Ok(())
    }

    /// What makes this replica's answers interchangeable with another's:
    /// engine, model, revision, tokenizer and chat template, hashed.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in [
            self.engine.as_str(),
            &self.model,
            &self.model_revision,
            &self.tokenizer,
            &self.chat_template_hash,
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        format!("fp1:{}", &hex::encode(hash.finalize())[..16])
    }

    /// The scrape interval.
    pub fn scrape_interval(&self) -> Duration {
        Duration::from_millis(self.scrape_interval_ms)
    }
}
