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
use crate::control_plane::ControlPlaneTlsArgs;
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

    /// Makes sure a certificate with life left is on disk: the one there,
    /// a renewal of it, or a new one for the join token.
    pub async fn ensure(&self) -> Result<Held, EnrollError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| EnrollError::Local(format!("{}: {e}", self.dir.display())))?;
        let now = SystemTime::now();
        match held(&self.identity_file()) {
            Some(held) if held.renew_at() > now => return Ok(held),
            Some(held) if held.not_after > now => return self.issue(None).await,
            _ => {}
        }
        match &self.join_token {
            Some(token) => self.issue(Some(token)).await,
            None => Err(EnrollError::NothingToRenewWith(self.dir.clone())),
        }
    }

    /// Gets a certificate, with `token` or by renewal, and writes it.
    async fn issue(&self, token: Option<&str>) -> Result<Held, EnrollError> {
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
        let client = tls.client().map_err(EnrollError::Local)?;
        let mut last = None;
        for address in &self.control_planes {
            let call = async {
                let channel = client.connect(address, Duration::from_secs(5)).await?;
                IdentityServiceClient::new(channel)
                    .issue(IssueRequest {
                        csr_pem: csr_pem.clone(),
                        join_token: token.unwrap_or_default().to_string(),
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
