//! An edge's or sidecar's own certificate, obtained from and renewed by the
//! control plane (`IdentityService.Issue`). At start, a process with a
//! join token (or a certificate from an earlier run with life left) gets
//! one; from then on it renews it at two-thirds of its life over mutual
//! TLS with the certificate it holds, with no restart.
//!
//! The private key and the certificate are written together into one file,
//! `<dir>/identity.pem` (mode 0600, replaced atomically), which the process
//! uses as both its control-plane certificate and key: a reader never sees
//! a new key with an old certificate. Each renewal makes a new key.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use infermesh_proto::v1::{IssueRequest, identity_service_client::IdentityServiceClient};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::control_plane::{ControlPlaneTlsArgs, ControlPlaneTlsError};
use crate::tls::pki;

/// The identity file under an identity directory.
pub const IDENTITY_FILE: &str = "identity.pem";

/// Why no certificate could be had.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The control plane refused or could not be reached.
    #[error("control plane {address}: {status}")]
    Refused {
        /// The control plane asked.
        address: String,
        /// Its answer.
        status: Box<tonic::Status>,
    },
    /// No join token, and no certificate with life left to renew with.
    #[error(
        "no certificate in {} with life left and no join token (--join-token-file) to get one",
        .0.display()
    )]
    NothingToRenewWith(PathBuf),
    /// A file could not be read or written, or a key made.
    #[error("{0}")]
    Local(String),
    /// The control-plane TLS files could not be read or used.
    #[error(transparent)]
    ControlPlaneTls(#[from] ControlPlaneTlsError),
}

/// Why the identity flags do not fit the control-plane TLS flags.
#[derive(Debug, thiserror::Error)]
pub enum EnrollFlagsError {
    /// A certificate and key were given as well as an identity directory.
    #[error(
        "--identity-dir replaces --control-plane-cert and --control-plane-key: give one or the other"
    )]
    CertAndIdentityDir,
    /// An identity directory with no CA to trust the control plane by.
    #[error(
        "--identity-dir needs --control-plane-ca (the CA that signed the control plane's certificate)"
    )]
    NoCa,
}

/// Why a process told to get its identity from the control plane has none.
#[derive(Debug, thiserror::Error)]
pub enum EnrollStartError {
    /// The flags do not fit together.
    #[error(transparent)]
    Flags(#[from] EnrollFlagsError),
    /// The join token file could not be read.
    #[error("--join-token-file {}: {error}", path.display())]
    JoinTokenFile {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        error: std::io::Error,
    },
    /// No identity can be had, however long this waits.
    #[error("--identity-dir {}: {error}", dir.display())]
    IdentityDir {
        /// The identity directory.
        dir: PathBuf,
        /// Why.
        error: EnrollError,
    },
    /// The control plane will not issue an identity (denied or invalid).
    #[error("the control plane at {address} refused to issue an identity: {}", status.message())]
    Refused {
        /// The control plane that refused.
        address: String,
        /// Its answer.
        status: Box<tonic::Status>,
    },
    /// Cancelled while the control plane could not be reached.
    #[error("stopped before an identity was issued")]
    Stopped,
}

/// What gets the first certificate.
#[derive(Debug, Clone, Copy)]
enum Bootstrap<'a> {
    /// A join token's secret.
    JoinToken(&'a str),
    /// A Kubernetes service-account token.
    ServiceAccount(&'a str),
}

/// Where and how to enrol.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// Control-plane addresses, tried in turn.
    pub control_planes: Vec<String>,
    /// The CA that signed the control plane's certificate.
    pub control_plane_ca: PathBuf,
    /// Directory holding `identity.pem`.
    pub dir: PathBuf,
    /// A join token secret, for the first certificate.
    pub join_token: Option<String>,
    /// Or, in Kubernetes, a projected service-account token file (read at
    /// each use: the kubelet rotates it).
    pub service_account_token_file: Option<PathBuf>,
    /// Sidecars: the endpoint id the certificate will name.
    pub endpoint_id: Option<String>,
}

/// A certificate held now.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Start of its validity.
    pub not_before: SystemTime,
    /// End of its validity.
    pub not_after: SystemTime,
}

impl Held {
    /// When to renew: two-thirds of the way through its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }
}

impl Enrollment {
    /// The file holding key and certificate.
    pub fn identity_file(&self) -> PathBuf {
        self.dir.join(IDENTITY_FILE)
    }

    /// TLS flags using the identity file as certificate and key.
    pub fn tls_args(&self) -> ControlPlaneTlsArgs {
        ControlPlaneTlsArgs {
            control_plane_ca: Some(self.control_plane_ca.clone()),
            control_plane_cert: Some(self.identity_file()),
            control_plane_key: Some(self.identity_file()),
        }
    }

    /// Makes sure a certificate with life left is on disk: the one there
    /// (renewed if it is past two-thirds of its life and the control plane
    /// answers), or a new one for the join token.
    pub async fn ensure(&self) -> Result<Held, EnrollError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| EnrollError::Local(format!("{}: {e}", self.dir.display())))?;
        let now = SystemTime::now();
        match held(&self.identity_file()) {
            Some(held) if held.renew_at() > now => return Ok(held),
            Some(held) if held.not_after > now => {
                // A process restarted while the control plane is away still
                // starts with the certificate it has.
                return match self.issue(None).await {
                    Ok(renewed) => Ok(renewed),
                    Err(error) => {
                        tracing::warn!(%error, "renewal failed; using the certificate held until it is renewed");
                        Ok(held)
                    }
                };
            }
            _ => {}
        }
        match (&self.join_token, &self.service_account_token_file) {
            (Some(token), _) => self.issue(Some(Bootstrap::JoinToken(token))).await,
            (None, Some(path)) => {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| EnrollError::Local(format!("{}: {e}", path.display())))?;
                self.issue(Some(Bootstrap::ServiceAccount(token.trim())))
                    .await
            }
            (None, None) => Err(EnrollError::NothingToRenewWith(self.dir.clone())),
        }
    }

    /// Gets a certificate, with `token` or by renewal, and writes it.
    async fn issue(&self, token: Option<Bootstrap<'_>>) -> Result<Held, EnrollError> {
        let (key_pem, csr_pem) =
            pki::new_key_and_csr().map_err(|e| EnrollError::Local(e.to_string()))?;
        let tls = match token {
            // The first call has no certificate to present.
            Some(_) => ControlPlaneTlsArgs {
                control_plane_ca: Some(self.control_plane_ca.clone()),
                control_plane_cert: None,
                control_plane_key: None,
            },
            None => self.tls_args(),
        };
        let client = tls.client()?;
        let mut last = None;
        for address in &self.control_planes {
            let call = async {
                let channel = client.connect(address, Duration::from_secs(5)).await?;
                IdentityServiceClient::new(channel)
                    .issue(IssueRequest {
                        csr_pem: csr_pem.clone(),
                        join_token: match token {
                            Some(Bootstrap::JoinToken(t)) => t.to_string(),
                            _ => String::new(),
                        },
                        service_account_token: match token {
                            Some(Bootstrap::ServiceAccount(t)) => t.to_string(),
                            _ => String::new(),
                        },
                        endpoint_id: self.endpoint_id.clone().unwrap_or_default(),
                    })
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(15), call).await {
                Ok(Ok(response)) => {
                    let issued = response.into_inner();
                    let mut file = key_pem.clone();
                    file.push_str(&issued.certificate_pem);
                    crate::fs::write_private(&self.identity_file(), file.as_bytes()).map_err(
                        |e| EnrollError::Local(format!("{}: {e}", self.identity_file().display())),
                    )?;
                    let held = held(&self.identity_file()).ok_or_else(|| {
                        EnrollError::Local("the issued certificate does not parse".into())
                    })?;
                    tracing::info!(identity = %issued.identity, renewal = token.is_none(), "certificate issued by the control plane");
                    return Ok(held);
                }
                Ok(Err(status)) => last = Some((address.clone(), status)),
                Err(_) => {
                    last = Some((
                        address.clone(),
                        tonic::Status::deadline_exceeded("no answer within 15 s"),
                    ))
                }
            }
        }
        let (address, status) = last.unwrap_or_else(|| {
            (
                String::new(),
                tonic::Status::invalid_argument("no control-plane address"),
            )
        });
        Err(EnrollError::Refused {
            address,
            status: Box::new(status),
        })
    }

    /// Renews the certificate at two-thirds of each life until `cancel`;
    /// a failed renewal is retried with backoff while the certificate is
    /// still valid.
    pub fn spawn_renewal(self, mut held: Held, cancel: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
            loop {
                let wait = held
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match self.issue(None).await {
                    Ok(renewed) => {
                        held = renewed;
                        backoff.reset();
                    }
                    Err(error) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in = ?delay, "certificate renewal failed");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        })
    }
}

/// The validity of the certificate in `path`, if it holds one.
pub fn held(path: &Path) -> Option<Held> {
    let certs = crate::tls::load_certs(path).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let validity = cert.validity();
    let at = |t: x509_parser::time::ASN1Time| -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).ok()?))
    };
    Some(Held {
        not_before: at(validity.not_before)?,
        not_after: at(validity.not_after)?,
    })
}

/// Flags for an identity issued by the control plane, shared by edge and sidecar.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EnrollArgs {
    /// Directory where this process keeps the identity the control plane
    /// issues it (`identity.pem`: key and certificate, mode 0600), renewed
    /// at two-thirds of its life with no restart. Used instead of
    /// --control-plane-cert and --control-plane-key; --control-plane-ca
    /// names the CA that signed the control plane's certificate.
    #[arg(long, env = "INFERMESH_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,

    /// File holding a join token (IdentityService/CreateJoinToken) that
    /// gets the first certificate; not read while the identity directory
    /// holds a certificate with life left.
    #[arg(long, env = "INFERMESH_JOIN_TOKEN_FILE", requires = "identity_dir")]
    pub join_token_file: Option<PathBuf>,

    /// In Kubernetes, instead of a join token: a projected service-account
    /// token file (audience `infermesh`), which the control plane checks
    /// with a TokenReview; the pod's infermesh.io annotations name the
    /// identity. Read again at each use.
    #[arg(
        long,
        env = "INFERMESH_SERVICE_ACCOUNT_TOKEN_FILE",
        requires = "identity_dir",
        conflicts_with = "join_token_file"
    )]
    pub service_account_token_file: Option<PathBuf>,
}

impl EnrollArgs {
    /// Checks the flags against the control-plane TLS flags.
    pub fn check(&self, tls: &ControlPlaneTlsArgs) -> Result<(), EnrollFlagsError> {
        if self.identity_dir.is_none() {
            return Ok(());
        }
        if tls.control_plane_cert.is_some() || tls.control_plane_key.is_some() {
            return Err(EnrollFlagsError::CertAndIdentityDir);
        }
        if tls.control_plane_ca.is_none() {
            return Err(EnrollFlagsError::NoCa);
        }
        Ok(())
    }

    /// With --identity-dir: gets or renews the identity (retrying every few
    /// seconds while the control plane cannot be reached, until `cancel`),
    /// points `tls` at it, and starts renewing it. Without: nothing.
    pub async fn enroll(
        &self,
        control_planes: &[String],
        tls: &mut ControlPlaneTlsArgs,
        endpoint_id: Option<String>,
        cancel: CancellationToken,
    ) -> Result<Option<JoinHandle<()>>, EnrollStartError> {
        let Some(dir) = &self.identity_dir else {
            return Ok(None);
        };
        self.check(tls)?;
        let join_token = match &self.join_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| EnrollStartError::JoinTokenFile {
                        path: path.clone(),
                        error,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let enrollment = Enrollment {
            control_planes: control_planes.to_vec(),
            control_plane_ca: tls.control_plane_ca.clone().unwrap_or_default(),
            dir: dir.clone(),
            join_token,
            service_account_token_file: self.service_account_token_file.clone(),
            endpoint_id,
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let held = loop {
            match enrollment.ensure().await {
                Ok(held) => break held,
                Err(
                    error @ (EnrollError::NothingToRenewWith(_)
                    | EnrollError::Local(_)
                    | EnrollError::ControlPlaneTls(_)),
                ) => {
                    return Err(EnrollStartError::IdentityDir {
                        dir: dir.clone(),
                        error,
                    });
                }
                Err(EnrollError::Refused { address, status })
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                            | tonic::Code::InvalidArgument
                            | tonic::Code::NotFound
                    ) =>
                {
                    return Err(EnrollStartError::Refused { address, status });
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "no identity yet");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(EnrollStartError::Stopped),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        *tls = enrollment.tls_args();
        Ok(Some(enrollment.spawn_renewal(held, cancel)))
    }
}
