//! The real `grpcurl` binary against the control plane's admin API, with
//! no .proto files: everything goes through server reflection, as an
//! operator would use it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::pki::CertPair;

/// A failed call as grpcurl reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcError {
    /// gRPC code name, e.g. `FailedPrecondition`.
    pub code: String,
    /// The server's message.
    pub message: String,
}

/// Runs grpcurl against one server.
#[derive(Debug, Clone)]
pub struct Grpcurl {
    binary: PathBuf,
    address: String,
    /// CA to trust; `None` means plaintext.
    ca: Option<PathBuf>,
    /// Client certificate to present.
    identity: Option<CertPair>,
    /// Extra `-H` headers.
    headers: Vec<String>,
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/grpcurl");
    if tools.is_file() {
        return tools;
    }
    crate::etcd::which("grpcurl")
        .expect("grpcurl not found: the test command installs it into .tools/bin")
}

impl Grpcurl {
    /// grpcurl for the plaintext server at `address` (host:port).
    pub fn new(address: &str) -> Self {
        Self {
            binary: binary(),
            address: address.to_string(),
            ca: None,
            identity: None,
            headers: Vec::new(),
        }
    }

    /// grpcurl over TLS to `address`, trusting `ca`.
    pub fn tls(address: &str, ca: &Path) -> Self {
        Self {
            ca: Some(ca.to_path_buf()),
            ..Self::new(address)
        }
    }

    /// The same, presenting `identity` as its client certificate.
    pub fn with_identity(&self, identity: CertPair) -> Self {
        Self {
            identity: Some(identity),
            ..self.clone()
        }
    }

    /// The same, without a client certificate.
    pub fn without_identity(&self) -> Self {
        Self {
            identity: None,
            ..self.clone()
        }
    }

    /// The same, sending `header` (`name: value`) with every call.
    pub fn with_header(&self, header: &str) -> Self {
        let mut next = self.clone();
        next.headers.push(header.to_string());
        next
    }

    fn transport_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        match &self.ca {
            None => args.push("-plaintext".to_string()),
            Some(ca) => {
                args.extend(["-cacert".to_string(), ca.display().to_string()]);
                if let Some(identity) = &self.identity {
                    args.extend([
                        "-cert".to_string(),
                        identity.cert.display().to_string(),
                        "-key".to_string(),
                        identity.key.display().to_string(),
                    ]);
                }
            }
        }
        for header in &self.headers {
            args.extend(["-H".to_string(), header.clone()]);
        }
        args
    }

    /// Runs grpcurl with `args` before the address and `after` behind it; stdout or the error.
    pub async fn raw(&self, args: &[&str], after: &[&str]) -> Result<String, GrpcError> {
        let output = tokio::process::Command::new(&self.binary)
            .args(self.transport_args())
            .args(args)
            .arg(&self.address)
            .args(after)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("grpcurl runs");
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let field = |name: &str| {
            stderr
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let code = field("Code:");
        Err(GrpcError {
            message: if code.is_empty() {
                stderr.trim().to_string()
            } else {
                field("Message:")
            },
            code,
        })
    }

    /// Calls `infermesh.v1.AdminService/<method>` with a JSON request.
    pub async fn admin(
        &self,
        method: &str,
        request: serde_json::Value,
    ) -> Result<serde_json::Value, GrpcError> {
        let body = request.to_string();
        let out = self
            .raw(
                &["-d", &body],
                &[&format!("infermesh.v1.AdminService/{method}")],
            )
            .await?;
        Ok(serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("grpcurl printed non-JSON ({e}): {out}")))
    }
}
