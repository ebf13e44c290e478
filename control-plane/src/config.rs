//! Command-line and environment configuration of the control plane,
//! validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// infermesh control plane: registry in etcd, admin API, routing-table and load-report streams.
#[derive(Debug, Clone, Parser)]
#[command(name = "infermesh-control-plane", version)]
pub struct Config {
    /// Address of the gRPC server (admin, discovery, load reports, health, reflection).
    #[arg(long, env = "INFERMESH_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,

    /// Address of the Prometheus metrics listener (GET /metrics).
    #[arg(long, env = "INFERMESH_METRICS_LISTEN", default_value = "0.0.0.0:9100")]
    pub metrics_listen: SocketAddr,

    /// Name of this replica in leader election (defaults to the host name).
    #[arg(long, env = "INFERMESH_NODE_ID")]
    pub node_id: Option<String>,

    /// Seconds a crashed leader keeps leadership before another replica takes over.
    #[arg(long, env = "INFERMESH_LEADER_TTL_SECONDS", default_value_t = 5)]
    pub leader_ttl_seconds: u32,

    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "INFERMESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// CA (PEM) that signed etcd's serving certificate; turns on TLS to
    /// etcd (endpoints then use https://).
    #[arg(long, env = "INFERMESH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "INFERMESH_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "INFERMESH_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

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

    /// Serving certificate chain (PEM) of the gRPC server; with --tls-key and
    /// --tls-client-ca every connection is TLS and edges and sidecars are
    /// checked by their client certificates.
    #[arg(long, env = "INFERMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "INFERMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) whose client certificates identify edges, sidecars and
    /// admins (spiffe://infermesh/<role>/<name>).
    #[arg(long, env = "INFERMESH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// File of admin bearer-token hashes, one `<name> sha256:<hex>` per line
    /// (`infermesh-certs admin-token` makes them). Admin calls need an admin
    /// client certificate or one of these tokens.
    #[arg(long, env = "INFERMESH_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,

    /// Serve gRPC without TLS: subscribers are not authenticated (anyone who
    /// can connect may subscribe as an edge). Local development only; admin
    /// calls still need a bearer token.
    #[arg(long, env = "INFERMESH_INSECURE_PLAINTEXT", default_value_t = false)]
    pub insecure_plaintext: bool,

    /// Let sidecar certificates that name no endpoint
    /// (`spiffe://infermesh/sidecar/<name>`, e.g. one certificate shared by
    /// every pod) register any endpoint id, pool and region; only the
    /// advertised address is then checked. Off: a sidecar registers only the
    /// endpoint its certificate names.
    #[arg(
        long,
        env = "INFERMESH_ALLOW_UNBOUND_SIDECARS",
        default_value_t = false
    )]
    pub allow_unbound_sidecars: bool,

    /// Registrations one sidecar identity may make per minute; more get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "INFERMESH_REGISTRATIONS_PER_MINUTE", default_value_t = 30)]
    pub registrations_per_minute: u32,

    /// CA certificate (PEM) the control plane issues edge and sidecar
    /// identities with (IdentityService.Issue): the mesh's root or an
    /// intermediate whose chain peers trust. Needs --ca-key. Unset: no
    /// certificates are issued.
    #[arg(long, env = "INFERMESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Private key (PEM) of --ca-cert.
    #[arg(long, env = "INFERMESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// Lifetime of issued certificates (e.g. `24h`, `60s`), 10 s to 30
    /// days; holders renew at two-thirds of it.
    #[arg(long, env = "INFERMESH_IDENTITY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub identity_ttl: std::time::Duration,

    /// Address of the sidecar-injection webhook (HTTPS, POST /mutate);
    /// unset: no webhook.
    #[arg(long, env = "INFERMESH_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<SocketAddr>,

    /// Serving certificate (PEM) of the webhook; reloaded when it changes.
    #[arg(long, env = "INFERMESH_WEBHOOK_TLS_CERT")]
    pub webhook_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --webhook-tls-cert.
    #[arg(long, env = "INFERMESH_WEBHOOK_TLS_KEY")]
    pub webhook_tls_key: Option<PathBuf>,

    /// Image of the injected sidecar container.
    #[arg(
        long,
        env = "INFERMESH_SIDECAR_IMAGE",
        default_value = "ghcr.io/infermesh/infermesh:latest"
    )]
    pub sidecar_image: String,

    /// host:port injected sidecars dial to reach the control plane.
    #[arg(
        long,
        env = "INFERMESH_SIDECAR_CONTROL_PLANE",
        default_value = "infermesh-control-plane:7070"
    )]
    pub sidecar_control_plane: String,

    /// kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) holding the
    /// injected sidecars' client certificate, in the pods' namespace; empty
    /// when the control plane runs with --insecure-plaintext.
    #[arg(long, env = "INFERMESH_SIDECAR_TLS_SECRET", default_value = "")]
    pub sidecar_tls_secret: String,

    /// How injected sidecars get their identity: `shared` (the certificate
    /// in --sidecar-tls-secret; they serve plain HTTP) or `issued` (each
    /// gets its own from this control plane for its pod's projected
    /// service-account token: needs --ca-cert and --kubernetes-token-review;
    /// only ca.crt of --sidecar-tls-secret is used; they serve mutual TLS).
    #[arg(
        long,
        env = "INFERMESH_SIDECAR_IDENTITY",
        value_enum,
        default_value = "shared"
    )]
    pub sidecar_identity: SidecarIdentity,

    /// How often sidecars report load, milliseconds.
    #[arg(long, env = "INFERMESH_REPORT_INTERVAL_MS", default_value_t = 1000)]
    pub report_interval_ms: u32,

    /// How often replicas exchange the loads their sidecars report and the
    /// state of their subscribers (through etcd), milliseconds.
    #[arg(
        long,
        env = "INFERMESH_LOAD_EXCHANGE_INTERVAL_MS",
        default_value_t = 2000
    )]
    pub load_exchange_interval_ms: u32,

    /// How often the leading replica makes autoscaling decisions, milliseconds.
    #[arg(long, env = "INFERMESH_AUTOSCALE_INTERVAL_MS", default_value_t = 5000)]
    pub autoscale_interval_ms: u32,

    /// How often the leading replica removes orphaned records (a deleted
    /// key's last-use time, a deleted pool's decision), seconds.
    #[arg(long, env = "INFERMESH_GC_INTERVAL_SECONDS", default_value_t = 60)]
    pub gc_interval_seconds: u32,

    /// What carries out autoscaling decisions besides the metric and the
    /// admin API: `none`, or `kubernetes` (sets each pool's scale_target
    /// through the scale subresource with the pod's service account).
    #[arg(long, env = "INFERMESH_SCALE_ACTUATOR", default_value = "none")]
    pub scale_actuator: String,

    /// Kubernetes API URL for the actuator; defaults to the in-cluster
    /// https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
    #[arg(long, env = "INFERMESH_KUBERNETES_API")]
    pub kubernetes_api: Option<String>,

    /// Service-account token file for the actuator; defaults to the mounted one.
    #[arg(long, env = "INFERMESH_KUBERNETES_TOKEN_FILE")]
    pub kubernetes_token_file: Option<PathBuf>,

    /// CA bundle of the Kubernetes API server; defaults to the mounted one.
    #[arg(long, env = "INFERMESH_KUBERNETES_CA")]
    pub kubernetes_ca: Option<PathBuf>,

    /// Issue identities (with --ca-cert) for pods' service-account tokens,
    /// checked with TokenReview against the Kubernetes API (the
    /// --kubernetes-* flags): a pod's infermesh.io annotations name the
    /// identity it gets. Needs RBAC to create tokenreviews and get pods.
    #[arg(
        long,
        env = "INFERMESH_KUBERNETES_TOKEN_REVIEW",
        default_value_t = false
    )]
    pub kubernetes_token_review: bool,

    /// Audience service-account tokens must be issued for.
    #[arg(long, env = "INFERMESH_TOKEN_AUDIENCE", default_value = "infermesh")]
    pub token_audience: String,
}

/// How the gRPC server is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// No TLS, no identities.
    Plaintext,
    /// TLS, with client certificates verified against `client_ca` when presented.
    Tls {
        /// Serving certificate.
        cert: PathBuf,
        /// Its key.
        key: PathBuf,
        /// CA of client certificates.
        client_ca: PathBuf,
    },
}

/// A flag, or a combination of flags, that cannot work; the text names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// --identity-ttl is outside its range.
    #[error("--identity-ttl: {0:?} is outside 10s..=30days")]
    IdentityTtl(Duration),
    /// A numeric flag is outside its range.
    #[error("{flag}: {value} is outside {range}")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: u32,
        /// The range allowed, as `low..=high`.
        range: &'static str,
    },
    /// Token review without a CA to issue certificates with.
    #[error("--kubernetes-token-review issues certificates: it needs --ca-cert and --ca-key")]
    TokenReviewWithoutCa,
    /// Issued sidecar identities without token review.
    #[error(
        "--sidecar-identity issued: sidecars get their identity for their pod's service-account token, which needs --kubernetes-token-review"
    )]
    IssuedWithoutTokenReview,
    /// The webhook without its serving certificate.
    #[error(
        "--webhook-listen needs --webhook-tls-cert and --webhook-tls-key (the API server only calls webhooks over HTTPS)"
    )]
    WebhookWithoutTls,
    /// No etcd endpoint.
    #[error("--etcd-endpoints: at least one endpoint is required")]
    NoEtcdEndpoints,
    /// The etcd prefix is not absolute.
    #[error("--etcd-prefix: {0:?} must start with '/'")]
    EtcdPrefix(String),
    /// An unknown scale actuator.
    #[error("--scale-actuator: {0:?} must be none or kubernetes")]
    ScaleActuator(String),
    /// An empty token audience.
    #[error("--token-audience: must not be empty")]
    EmptyTokenAudience,
    /// Only one of the etcd client certificate and key.
    #[error("--etcd-cert and --etcd-key must be given together")]
    EtcdPairIncomplete,
    /// An etcd client certificate without the CA.
    #[error("--etcd-cert needs --etcd-ca")]
    EtcdCertWithoutCa,
    /// The etcd TLS files are unusable.
    #[error("--etcd-ca/--etcd-cert: {0}")]
    EtcdTls(#[source] infermesh_runtime::tls::TlsError),
    /// Plaintext without another way to authenticate admin calls.
    #[error(
        "--insecure-plaintext: admin calls need --admin-tokens-file (there are no client certificates without TLS)"
    )]
    PlaintextWithoutAdminTokens,
    /// Plaintext together with TLS flags.
    #[error(
        "--insecure-plaintext cannot be combined with --tls-cert, --tls-key or --tls-client-ca"
    )]
    PlaintextWithTls,
    /// Neither TLS nor plaintext asked for.
    #[error(
        "TLS is required: give --tls-cert, --tls-key and --tls-client-ca (or --insecure-plaintext for local development)"
    )]
    TlsRequired,
    /// Only some of the TLS flags.
    #[error("--tls-cert, --tls-key and --tls-client-ca must be given together")]
    TlsIncomplete,
    /// The Kubernetes API cannot be reached as configured.
    #[error(transparent)]
    Kube(#[from] crate::autoscale::kube::KubeError),
}

impl Config {
    /// Checks values clap cannot, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(std::time::Duration::from_secs(10)..=std::time::Duration::from_secs(30 * 86_400))
            .contains(&self.identity_ttl)
        {
            return Err(ConfigError::IdentityTtl(self.identity_ttl));
        }
        self.transport()?;
        self.etcd_tls()?;
        if self.kubernetes_token_review && self.ca_cert.is_none() {
            return Err(ConfigError::TokenReviewWithoutCa);
        }
        if self.sidecar_identity == SidecarIdentity::Issued && !self.kubernetes_token_review {
            return Err(ConfigError::IssuedWithoutTokenReview);
        }
        if !(2..=60).contains(&self.leader_ttl_seconds) {
            return Err(ConfigError::OutOfRange {
                flag: "--leader-ttl-seconds",
                value: self.leader_ttl_seconds,
                range: "2..=60",
            });
        }
        if self.webhook_listen.is_some()
            && (self.webhook_tls_cert.is_none() || self.webhook_tls_key.is_none())
        {
            return Err(ConfigError::WebhookWithoutTls);
        }
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(ConfigError::NoEtcdEndpoints);
        }
        if !self.etcd_prefix.starts_with('/') {
            return Err(ConfigError::EtcdPrefix(self.etcd_prefix.clone()));
        }
        if !(2..=300).contains(&self.endpoint_lease_ttl_seconds) {
            return Err(ConfigError::OutOfRange {
                flag: "--endpoint-lease-ttl-seconds",
                value: self.endpoint_lease_ttl_seconds,
                range: "2..=300",
            });
        }
        if !(100..=60_000).contains(&self.report_interval_ms) {
            return Err(ConfigError::OutOfRange {
                flag: "--report-interval-ms",
                value: self.report_interval_ms,
                range: "100..=60000",
            });
        }
        if !(100..=60_000).contains(&self.load_exchange_interval_ms) {
            return Err(ConfigError::OutOfRange {
                flag: "--load-exchange-interval-ms",
                value: self.load_exchange_interval_ms,
                range: "100..=60000",
            });
        }
        if !(100..=300_000).contains(&self.autoscale_interval_ms) {
            return Err(ConfigError::OutOfRange {
                flag: "--autoscale-interval-ms",
                value: self.autoscale_interval_ms,
                range: "100..=300000",
            });
        }
        if !(1..=3600).contains(&self.gc_interval_seconds) {
            return Err(ConfigError::OutOfRange {
                flag: "--gc-interval-seconds",
                value: self.gc_interval_seconds,
                range: "1..=3600",
            });
        }
        if !matches!(self.scale_actuator.as_str(), "none" | "kubernetes") {
            return Err(ConfigError::ScaleActuator(self.scale_actuator.clone()));
        }
        Ok(())
    }

    /// The Kubernetes actuator, when --scale-actuator=kubernetes.
    pub fn actuator(&self) -> Result<Option<crate::autoscale::kube::KubeClient>, ConfigError> {
        if self.scale_actuator != "kubernetes" {
            return Ok(None);
        }
        let config = crate::autoscale::kube::KubeConfig::in_cluster(
            "--scale-actuator=kubernetes",
            self.kubernetes_api.clone(),
            self.kubernetes_token_file.clone(),
            self.kubernetes_ca.clone(),
        )?;
        Ok(Some(crate::autoscale::kube::KubeClient::new(&config)?))
    }

    /// The token reviewer, when --kubernetes-token-review is on.
    pub fn token_reviewer(
        &self,
    ) -> Result<Option<crate::token_review::TokenReviewer>, ConfigError> {
        if !self.kubernetes_token_review {
            return Ok(None);
        }
        if self.token_audience.is_empty() {
            return Err(ConfigError::EmptyTokenAudience);
        }
        let config = crate::autoscale::kube::KubeConfig::in_cluster(
            "--kubernetes-token-review",
            self.kubernetes_api.clone(),
            self.kubernetes_token_file.clone(),
            self.kubernetes_ca.clone(),
        )?;
        let client = crate::autoscale::kube::KubeClient::new(&config)?;
        Ok(Some(crate::token_review::TokenReviewer::new(
            client,
            self.token_audience.clone(),
        )))
    }

    /// TLS to etcd, when --etcd-ca is given; files are read and checked now.
    pub fn etcd_tls(&self) -> Result<Option<crate::store::EtcdTlsFiles>, ConfigError> {
        let pair = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => return Err(ConfigError::EtcdPairIncomplete),
        };
        match (&self.etcd_ca, pair) {
            (Some(ca), pair) => {
                let pair_paths = pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                // Read once now so that a bad file stops the process at start.
                infermesh_runtime::tls::client_config(ca, pair_paths)
                    .map_err(ConfigError::EtcdTls)?;
                Ok(Some(crate::store::EtcdTlsFiles {
                    ca: ca.clone(),
                    pair,
                }))
            }
            (None, Some(_)) => Err(ConfigError::EtcdCertWithoutCa),
            (None, None) => Ok(None),
        }
    }

    /// This replica's name in leader election.
    pub fn node_id(&self) -> String {
        self.node_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("control-plane-{}", std::process::id()))
    }

    /// The transport the flags ask for.
    pub fn transport(&self) -> Result<Transport, ConfigError> {
        let tls = (&self.tls_cert, &self.tls_key, &self.tls_client_ca);
        match (tls, self.insecure_plaintext) {
            ((None, None, None), true) => {
                if self.admin_tokens_file.is_none() {
                    return Err(ConfigError::PlaintextWithoutAdminTokens);
                }
                Ok(Transport::Plaintext)
            }
            (_, true) => Err(ConfigError::PlaintextWithTls),
            ((Some(cert), Some(key), Some(client_ca)), false) => Ok(Transport::Tls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            }),
            ((None, None, None), false) => Err(ConfigError::TlsRequired),
            _ => Err(ConfigError::TlsIncomplete),
        }
    }

    /// The report interval as a duration.
    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.report_interval_ms))
    }
}

/// How injected sidecars get their identity (--sidecar-identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarIdentity {
    /// One certificate from a Secret, shared by every pod.
    Shared,
    /// Each pod's own, issued for its service-account token.
    Issued,
}
