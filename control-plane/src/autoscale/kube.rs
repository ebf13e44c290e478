//! The Kubernetes API client: the optional actuator sets a Deployment's or
//! StatefulSet's replica count through the scale subresource, and the
//! identity service checks service-account tokens (TokenReview) and reads
//! pods. Calls are authenticated with the pod's own service-account token
//! (read on every call, as projected tokens rotate) over TLS verified
//! against the cluster CA.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use infermesh_proto::v1::ScaleTarget;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why the Kubernetes API could not be set up or did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No API server was named and the process is not in a pod.
    #[error(
        "{needed_by}: KUBERNETES_SERVICE_HOST is not set (not in a pod?); pass --kubernetes-api"
    )]
    NotInCluster {
        /// The flag that needs the API server.
        needed_by: &'static str,
    },
    /// --kubernetes-api is not a URL.
    #[error("--kubernetes-api {api:?}: {source}")]
    ApiUrl {
        /// The value given.
        api: String,
        /// What the URI parser said.
        source: http::uri::InvalidUri,
    },
    /// --kubernetes-api is not an https:// URL.
    #[error("--kubernetes-api {api:?}: must be an https:// URL")]
    NotHttps {
        /// The value given.
        api: String,
    },
    /// --kubernetes-api names no host.
    #[error("--kubernetes-api {api:?}: no host")]
    NoHost {
        /// The value given.
        api: String,
    },
    /// The cluster CA could not be loaded.
    #[error("--kubernetes-ca: {0}")]
    Ca(#[source] infermesh_runtime::tls::TlsError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    TlsConfig(#[from] rustls::Error),
    /// The API server's host is not a name TLS can verify.
    #[error(transparent)]
    ServerName(#[from] rustls::pki_types::InvalidDnsNameError),
    /// The service-account token could not be read.
    #[error("service-account token {}: {source}", path.display())]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No TCP connection to the API server.
    #[error("connect {host}:{port}: {source}")]
    Connect {
        /// API server host.
        host: String,
        /// API server port.
        port: u16,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with the API server failed.
    #[error("TLS to {host}: {source}")]
    Handshake {
        /// API server host.
        host: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request could not be built.
    #[error(transparent)]
    Request(#[from] http::Error),
    /// The HTTP exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The API server took too long.
    #[error("the Kubernetes API did not answer within 10 s")]
    Timeout,
    /// The scale target names a kind without a scale subresource here.
    #[error("scale_target.kind {kind:?}: must be Deployment or StatefulSet")]
    UnknownKind {
        /// The kind named.
        kind: String,
    },
    /// The API server answered with an error status.
    #[error("Kubernetes API answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The Status object's message.
        message: String,
    },
}

/// Where the in-cluster API server and credentials are.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// `https://host:port` of the API server.
    pub api: String,
    /// Service-account token file.
    pub token_file: PathBuf,
    /// CA bundle the API server's certificate chains to.
    pub ca_file: PathBuf,
}

impl KubeConfig {
    /// The in-cluster settings: KUBERNETES_SERVICE_HOST/PORT and the
    /// mounted service account, each overridable; `needed_by` is the flag
    /// that asks for the API server, named when there is none.
    pub fn in_cluster(
        needed_by: &'static str,
        api: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, KubeError> {
        let api = match api {
            Some(api) => api,
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .map_err(|_| KubeError::NotInCluster { needed_by })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let dir = PathBuf::from(SERVICE_ACCOUNT_DIR);
        Ok(Self {
            api,
            token_file: token_file.unwrap_or_else(|| dir.join("token")),
            ca_file: ca_file.unwrap_or_else(|| dir.join("ca.crt")),
        })
    }
}

/// A client for the Kubernetes API.
pub struct KubeClient {
    host: String,
    port: u16,
    token_file: PathBuf,
    tls: TlsConnector,
}

/// A workload's replica counts as the API server reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// spec.replicas
    pub spec: u32,
    /// status.replicas
    pub status: u32,
}

fn resource(target: &ScaleTarget) -> Result<&'static str, KubeError> {
    match target.kind.as_str() {
        "" | "Deployment" => Ok("deployments"),
        "StatefulSet" => Ok("statefulsets"),
        other => Err(KubeError::UnknownKind {
            kind: other.to_string(),
        }),
    }
}

/// "Deployment gpu/llama" for reasons and logs.
pub fn describe(target: &ScaleTarget) -> String {
    let kind = if target.kind.is_empty() {
        "Deployment"
    } else {
        &target.kind
    };
    format!("{kind} {}/{}", target.namespace, target.name)
}

impl KubeClient {
    /// A client for `config`; the CA is read now, the token on every call.
    pub fn new(config: &KubeConfig) -> Result<Self, KubeError> {
        let url: http::Uri = config.api.parse().map_err(|source| KubeError::ApiUrl {
            api: config.api.clone(),
            source,
        })?;
        if url.scheme_str() != Some("https") {
            return Err(KubeError::NotHttps {
                api: config.api.clone(),
            });
        }
        let host = url
            .host()
            .ok_or_else(|| KubeError::NoHost {
                api: config.api.clone(),
            })?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let roots = infermesh_runtime::tls::root_store(&config.ca_file).map_err(KubeError::Ca)?;
        let tls = rustls::ClientConfig::builder_with_provider(infermesh_runtime::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            host,
            port: url.port_u16().unwrap_or(443),
            token_file: config.token_file.clone(),
            tls: TlsConnector::from(Arc::new(tls)),
        })
    }

    /// One call; the answer's status and body.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), KubeError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| KubeError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let server = ServerName::try_from(self.host.clone())?;
        let exchange = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| KubeError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    source,
                })?;
            let tls =
                self.tls
                    .connect(server, tcp)
                    .await
                    .map_err(|source| KubeError::Handshake {
                        host: self.host.clone(),
                        source,
                    })?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            let mut request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(http::header::HOST, &self.host)
                .header(http::header::ACCEPT, "application/json")
                .header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", token.trim()),
                );
            if body.is_some() {
                let content_type = if method == Method::PATCH {
                    "application/merge-patch+json"
                } else {
                    "application/json"
                };
                request = request.header(http::header::CONTENT_TYPE, content_type);
            }
            let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok::<_, KubeError>((status, bytes))
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| KubeError::Timeout)?
    }

    fn path(target: &ScaleTarget) -> Result<String, KubeError> {
        Ok(format!(
            "/apis/apps/v1/namespaces/{}/{}/{}/scale",
            target.namespace,
            resource(target)?,
            target.name
        ))
    }

    fn parse(status: StatusCode, body: &[u8]) -> Result<Scale, KubeError> {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        if !status.is_success() {
            let message = value["message"].as_str().unwrap_or("no message");
            return Err(KubeError::Refused {
                status,
                message: message.to_string(),
            });
        }
        let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32;
        Ok(Scale {
            spec: count(&value["spec"]["replicas"]),
            status: count(&value["status"]["replicas"]),
        })
    }

    /// The workload's replica counts.
    pub async fn get(&self, target: &ScaleTarget) -> Result<Scale, KubeError> {
        let (status, body) = self.call(Method::GET, &Self::path(target)?, None).await?;
        Self::parse(status, &body)
    }

    /// Sets spec.replicas; the scale the API server answered with.
    pub async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<Scale, KubeError> {
        let patch = serde_json::json!({"spec": {"replicas": replicas}}).to_string();
        let (status, body) = self
            .call(
                Method::PATCH,
                &Self::path(target)?,
                Some(patch.into_bytes()),
            )
            .await?;
        Self::parse(status, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_resource_kind() {
        let target = ScaleTarget {
            namespace: "gpu".into(),
            kind: String::new(),
            name: "llama".into(),
        };
        assert_eq!(
            KubeClient::path(&target).unwrap(),
            "/apis/apps/v1/namespaces/gpu/deployments/llama/scale"
        );
        assert_eq!(describe(&target), "Deployment gpu/llama");
        let sts = ScaleTarget {
            kind: "StatefulSet".into(),
            ..target.clone()
        };
        assert!(
            KubeClient::path(&sts)
                .unwrap()
                .contains("/statefulsets/llama/scale")
        );
        let bad = ScaleTarget {
            kind: "DaemonSet".into(),
            ..target
        };
        assert!(KubeClient::path(&bad).is_err());
    }

    #[test]
    fn answers_are_read_and_refusals_explained() {
        let ok = br#"{"kind":"Scale","spec":{"replicas":5},"status":{"replicas":3}}"#;
        assert_eq!(
            KubeClient::parse(StatusCode::OK, ok).unwrap(),
            Scale { spec: 5, status: 3 }
        );
        let forbidden = br#"{"kind":"Status","message":"deployments.apps \"llama\" is forbidden"}"#;
        let error = KubeClient::parse(StatusCode::FORBIDDEN, forbidden)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("403") && error.contains("forbidden"),
            "{error}"
        );
    }
}
