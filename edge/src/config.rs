//! Command-line and environment configuration of the edge.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use infermesh_runtime::control_plane::ControlPlaneTlsArgs;
use infermesh_runtime::enroll::EnrollArgs;
use infermesh_runtime::http::ServeOptions;
use infermesh_runtime::tls::mesh::MeshTls;

/// Where the response cache keeps answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheBackend {
    /// No response cache.
    None,
    /// In this edge's memory.
    Memory,
    /// In Redis, shared by the edges pointed at it.
    Redis,
}

/// infermesh edge: the region's OpenAI-compatible gateway.
#[derive(Debug, Clone, Parser)]
#[command(name = "infermesh-edge", version)]
pub struct Config {
    /// Address of the OpenAI-compatible HTTP server.
    #[arg(long, env = "INFERMESH_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the mesh listener, for peer edges' spillover: HTTPS with
    /// this edge's identity (--control-plane-cert or --identity-dir), only
    /// clients with an edge certificate from the mesh CA (others: 403).
    /// Point the region's `edge_address` here. Unset: no mesh listener.
    #[arg(long, env = "INFERMESH_MESH_LISTEN")]
    pub mesh_listen: Option<SocketAddr>,

    /// Address of the Prometheus metrics listener (GET /metrics).
    #[arg(long, env = "INFERMESH_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Region this edge serves.
    #[arg(long, env = "INFERMESH_REGION")]
    pub region: String,

    /// Unique id of this edge (defaults to the host name).
    #[arg(long, env = "INFERMESH_NODE_ID")]
    pub node_id: Option<String>,

    /// Control-plane addresses, comma-separated (host:port or http://host:port).
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

    /// How this edge reaches replicas' sidecars. `mutual`: HTTPS
    /// presenting this edge's identity (--control-plane-cert, reloaded
    /// when renewed); a sidecar's certificate must come from the mesh CA
    /// (--control-plane-ca) and name the very endpoint chosen
    /// (spiffe://infermesh/sidecar/<region>/<pool>/<endpoint>), or the
    /// attempt fails and another replica is tried. `off`: plain HTTP.
    #[arg(
        long,
        env = "INFERMESH_UPSTREAM_TLS",
        value_enum,
        default_value = "mutual"
    )]
    pub upstream_tls: MeshTls,

    /// Serving certificate chain (PEM); with --tls-key the listener speaks
    /// HTTPS (HTTP/1.1 and h2 by ALPN). Reloaded when the files change.
    #[arg(long, env = "INFERMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "INFERMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// How often --tls-cert and --tls-key are checked for changes, milliseconds.
    #[arg(long, env = "INFERMESH_TLS_RELOAD_INTERVAL_MS", default_value_t = 2000)]
    pub tls_reload_interval_ms: u64,

    /// A client must finish the TLS handshake and each request's headers
    /// within this time, milliseconds; slower connections are closed.
    #[arg(
        long,
        env = "INFERMESH_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_read_timeout_ms: u64,

    /// Time an idle plaintext HTTP/1.1 keep-alive connection keeps its
    /// buffers after a request, milliseconds; then it waits for the next
    /// request holding only its socket. At most 32 idle connections keep
    /// them at a time, any more rest at once (0: all rest at once).
    #[arg(
        long,
        env = "INFERMESH_IDLE_CONNECTION_REST_MS",
        default_value_t = 1000
    )]
    pub idle_connection_rest_ms: u64,

    /// Largest request head (request line and headers), bytes; larger gets 431.
    #[arg(long, env = "INFERMESH_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// A request's whole body must arrive within this time of its head
    /// (e.g. `30s`, `500ms`); a slower upload gets 408 and its connection
    /// is closed.
    #[arg(long, env = "INFERMESH_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: std::time::Duration,

    /// Failed authentications one client address may make in a minute;
    /// past them it gets 429 without its key being checked until the
    /// minute is over (0: no limit).
    #[arg(long, env = "INFERMESH_AUTH_FAILURES_PER_MINUTE", default_value_t = 60)]
    pub auth_failures_per_minute: u32,

    /// Largest request body accepted, bytes.
    #[arg(long, env = "INFERMESH_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Deadline for connecting to a replica, milliseconds.
    #[arg(
        long,
        env = "INFERMESH_UPSTREAM_CONNECT_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub upstream_connect_timeout_ms: u64,

    /// Deadline for a replica's response headers, milliseconds (a
    /// non-streamed completion sends them only when it is done).
    #[arg(
        long,
        env = "INFERMESH_UPSTREAM_RESPONSE_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    pub upstream_response_timeout_ms: u64,

    /// Longest gap between two chunks of a replica's response body,
    /// milliseconds; a stream past it ends with an error event (code
    /// `deadline`) and is logged and counted as cut. A model's own
    /// `timeouts.idle_ms` takes precedence.
    #[arg(
        long,
        env = "INFERMESH_UPSTREAM_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub upstream_idle_timeout_ms: u64,

    /// A streamed request held at the edge (waiting for its turn in a
    /// full model's queue, or for a pool to scale up from zero) for longer
    /// than this many milliseconds is answered 200 with an event stream and
    /// gets an SSE comment (`: waiting`) at this interval until it goes
    /// out; a refusal after that comes as an error event. 0: never.
    #[arg(long, env = "INFERMESH_SSE_KEEPALIVE_MS", default_value_t = 10_000)]
    pub sse_keepalive_ms: u64,

    /// Most attempts on other replicas for one request (refused or lost
    /// connections and 502/503 before any byte reached the client).
    #[arg(long, env = "INFERMESH_MAX_RETRIES", default_value_t = 2)]
    pub max_retries: u32,

    /// Retries allowed as a share of requests (retry budget).
    #[arg(long, env = "INFERMESH_RETRY_BUDGET_RATIO", default_value_t = 0.2)]
    pub retry_budget_ratio: f64,

    /// Failures in a row that eject a replica from this edge's rotation.
    #[arg(long, env = "INFERMESH_EJECT_AFTER_FAILURES", default_value_t = 3)]
    pub eject_after_failures: u32,

    /// First ejection's length, milliseconds; doubles with each ejection in a row (to 5 minutes).
    #[arg(long, env = "INFERMESH_EJECTION_MS", default_value_t = 5000)]
    pub ejection_ms: u64,

    /// File the last routing table is saved to after every push, and read
    /// at start, so the edge serves (marked stale) when no control plane is
    /// reachable, across restarts too.
    #[arg(long, env = "INFERMESH_TABLE_CACHE")]
    pub table_cache: Option<std::path::PathBuf>,

    /// Serve requests that present no API key, without limits (local
    /// development only; a presented key is still checked).
    #[arg(long, env = "INFERMESH_ALLOW_ANONYMOUS", default_value_t = false)]
    pub allow_anonymous: bool,

    /// Completion tokens reserved against token limits when a request sets
    /// no max_tokens (settled against the real usage when it ends).
    #[arg(
        long,
        env = "INFERMESH_DEFAULT_COMPLETION_RESERVE",
        default_value_t = 256
    )]
    pub default_completion_reserve: u64,

    /// How often rate-limit usage is reported to the control plane, milliseconds.
    #[arg(
        long,
        env = "INFERMESH_USAGE_REPORT_INTERVAL_MS",
        default_value_t = 200
    )]
    pub usage_report_interval_ms: u64,

    /// How long an admission this edge's share of a rate limit cannot cover
    /// waits for a loan from the control plane's reserve before it refuses,
    /// milliseconds. One round trip on the edge's stream.
    #[arg(long, env = "INFERMESH_QUOTA_BORROW_WAIT_MS", default_value_t = 20)]
    pub quota_borrow_wait_ms: u64,

    /// Write one JSON access-log line per request to stdout.
    #[arg(
        long,
        env = "INFERMESH_ACCESS_LOG",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub access_log: bool,

    /// Response cache: `memory` (this edge), `redis` (shared by a region's
    /// edges), or `none`. Models opt in through their cache policy.
    #[arg(long, env = "INFERMESH_CACHE", value_enum, default_value = "memory")]
    pub cache: CacheBackend,

    /// Bytes the in-memory cache may hold (keys and answers).
    #[arg(long, env = "INFERMESH_CACHE_MEMORY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cache_memory_bytes: u64,

    /// Redis URL of the shared cache (redis://host:port/db, rediss:// for
    /// TLS; a password in it is never shown in help, logs or errors).
    #[arg(long, env = "INFERMESH_CACHE_REDIS_URL", hide_env_values = true)]
    pub cache_redis_url: Option<String>,

    /// Deadline of one Redis call, milliseconds; a slower cache is skipped.
    #[arg(long, env = "INFERMESH_CACHE_REDIS_TIMEOUT_MS", default_value_t = 100)]
    pub cache_redis_timeout_ms: u64,

    /// Lifetime of a cached answer when the model's policy sets none, seconds.
    #[arg(
        long,
        env = "INFERMESH_CACHE_DEFAULT_TTL_SECONDS",
        default_value_t = 300
    )]
    pub cache_default_ttl_seconds: u64,

    /// Largest answer cached when the model's policy sets none, bytes.
    #[arg(long, env = "INFERMESH_CACHE_MAX_ENTRY_BYTES", default_value_t = 1024 * 1024)]
    pub cache_max_entry_bytes: usize,

    /// How long a request waits for an identical one already at the engine, milliseconds.
    #[arg(long, env = "INFERMESH_CACHE_WAIT_MS", default_value_t = 30_000)]
    pub cache_wait_ms: u64,

    /// Time given to in-flight requests on shutdown, seconds.
    #[arg(long, env = "INFERMESH_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
}

/// A flag, or a combination of flags, that cannot work; the text names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required flag is empty.
    #[error("{flag}: required")]
    Required {
        /// The flag.
        flag: &'static str,
    },
    /// No control-plane address.
    #[error("--control-plane: at least one address is required")]
    NoControlPlane,
    /// A flag that must be positive is zero.
    #[error("{flag}: must be positive")]
    NotPositive {
        /// The flag.
        flag: &'static str,
    },
    /// One of flags that must all be positive is zero.
    #[error("{flags} must be positive")]
    NotAllPositive {
        /// The flags, as a list in words.
        flags: &'static str,
    },
    /// The TLS or enrolment flags for the control plane do not fit together.
    #[error("{0}")]
    ControlPlane(String),
    /// The mesh listener without a certificate to serve.
    #[error("--mesh-listen: {0}")]
    MeshWithoutIdentity(String),
    /// Mutual TLS to replicas without a certificate to present.
    #[error("--upstream-tls mutual: {0} (or --upstream-tls off)")]
    MutualWithoutIdentity(String),
    /// The Redis cache without its URL.
    #[error("--cache redis: --cache-redis-url is required")]
    NoRedisUrl,
    /// The retry budget is not a fraction.
    #[error("--retry-budget-ratio: must be between 0 and 1")]
    RetryBudgetRatio,
    /// The header limit is below what any client needs.
    #[error(
        "--max-header-bytes: {bytes} is below the minimum of {}",
        ServeOptions::MIN_HEADER_BYTES
    )]
    HeaderBytes {
        /// The value given.
        bytes: usize,
    },
}

impl Config {
    /// Checks values clap cannot, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.region.is_empty() {
            return Err(ConfigError::Required { flag: "--region" });
        }
        if self.control_plane.iter().all(|a| a.trim().is_empty()) {
            return Err(ConfigError::NoControlPlane);
        }
        if self.usage_report_interval_ms == 0 {
            return Err(ConfigError::NotPositive {
                flag: "--usage-report-interval-ms",
            });
        }
        self.control_plane_tls
            .client()
            .map_err(|e| ConfigError::ControlPlane(e.to_string()))?;
        self.enroll
            .check(&self.control_plane_tls)
            .map_err(|e| ConfigError::ControlPlane(e.to_string()))?;
        if self.mesh_listen.is_some() && self.enroll.identity_dir.is_none() {
            self.control_plane_tls
                .identity_files()
                .map_err(|e| ConfigError::MeshWithoutIdentity(e.to_string()))?;
        }
        if self.upstream_tls == MeshTls::Mutual && self.enroll.identity_dir.is_none() {
            self.control_plane_tls
                .identity_files()
                .map_err(|e| ConfigError::MutualWithoutIdentity(e.to_string()))?;
        }
        if self.cache == CacheBackend::Redis && self.cache_redis_url.is_none() {
            return Err(ConfigError::NoRedisUrl);
        }
        if self.cache_redis_timeout_ms == 0 || self.cache_default_ttl_seconds == 0 {
            return Err(ConfigError::NotAllPositive {
                flags: "--cache-redis-timeout-ms and --cache-default-ttl-seconds",
            });
        }
        if !(0.0..=1.0).contains(&self.retry_budget_ratio) {
            return Err(ConfigError::RetryBudgetRatio);
        }
        if self.eject_after_failures == 0 || self.ejection_ms == 0 {
            return Err(ConfigError::NotAllPositive {
                flags: "--eject-after-failures and --ejection-ms",
            });
        }
        if self.tls_reload_interval_ms == 0 {
            return Err(ConfigError::NotPositive {
                flag: "--tls-reload-interval-ms",
            });
        }
        if self.header_read_timeout_ms == 0 {
            return Err(ConfigError::NotPositive {
                flag: "--header-read-timeout-ms",
            });
        }
        if self.max_header_bytes < ServeOptions::MIN_HEADER_BYTES {
            return Err(ConfigError::HeaderBytes {
                bytes: self.max_header_bytes,
            });
        }
        if self.body_timeout.is_zero() {
            return Err(ConfigError::NotPositive {
                flag: "--body-timeout",
            });
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::NotPositive {
                flag: "--max-body-bytes",
            });
        }
        if self.upstream_connect_timeout_ms == 0
            || self.upstream_response_timeout_ms == 0
            || self.upstream_idle_timeout_ms == 0
        {
            return Err(ConfigError::NotAllPositive {
                flags: "--upstream-connect-timeout-ms, --upstream-response-timeout-ms and --upstream-idle-timeout-ms",
            });
        }
        Ok(())
    }

    /// This edge's node id.
    pub fn node_id(&self) -> String {
        self.node_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("edge-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }

    /// Connect deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_timeout_ms)
    }

    /// Longest gap between two chunks of a response.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_idle_timeout_ms)
    }

    /// Response-headers deadline.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_response_timeout_ms)
    }
}
