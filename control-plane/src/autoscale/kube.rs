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
    /// mounted service account, each overridable.
    pub fn in_cluster(
        api: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, String> {
        let api = match api {
            Some(api) => api,
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    "--scale-actuator=kubernetes: KUBERNETES_SERVICE_HOST is not set (not in a pod?); pass --kubernetes-api".to_string()
                })?;
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

fn resource(target: &ScaleTarget) -> Result<&'static str, String> {
    match target.kind.as_str() {
        "" | "Deployment" => Ok("deployments"),
        "StatefulSet" => Ok("statefulsets"),
        other => Err(format!(
            "scale_target.kind {other:?}: must be Deployment or StatefulSet"
        )),
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
    pub fn new(config: &KubeConfig) -> Result<Self, String> {
        let url: http::Uri = config
            .api
            .parse()
            .map_err(|e| format!("--kubernetes-api {:?}: {e}", config.api))?;
        if url.scheme_str() != Some("https") {
            return Err(format!(
                "--kubernetes-api {:?}: must be an https:// URL",
                config.api
            ));
        }
        let host = url
            .host()
            .ok_or_else(|| format!("--kubernetes-api {:?}: no host", config.api))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let roots = infermesh_runtime::tls::root_store(&config.ca_file)
            .map_err(|e| format!("--kubernetes-ca: {e}"))?;
        let tls = rustls::ClientConfig::builder_with_provider(infermesh_runtime::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
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
    ) -> Result<(StatusCode, Bytes), String> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("service-account token {}: {e}", self.token_file.display()))?;
        let server = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        let exchange = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect {}:{}: {e}", self.host, self.port))?;
            let tls = self
                .tls
                .connect(server, tcp)
                .await
                .map_err(|e| format!("TLS to {}: {e}", self.host))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
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
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| "the Kubernetes API did not answer within 10 s".to_string())?
    }

    fn path(target: &ScaleTarget) -> Result<String, String> {
        Ok(format!(
            "/apis/apps/v1/namespaces/{}/{}/{}/scale",
            target.namespace,
            resource(target)?,
            target.name
        ))
    }

    fn parse(status: StatusCode, body: &[u8]) -> Result<Scale, String> {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        if !status.is_success() {
            let message = value["message"].as_str().unwrap_or("no message");
            return Err(format!("Kubernetes API answered {status}: {message}"));
        }
        let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32;
        Ok(Scale {
            spec: count(&value["spec"]["replicas"]),
            status: count(&value["status"]["replicas"]),
        })
    }

    /// The workload's replica counts.
    pub async fn get(&self, target: &ScaleTarget) -> Result<Scale, String> {
        let (status, body) = self.call(Method::GET, &Self::path(target)?, None).await?;
        Self::parse(status, &body)
    }

    /// Sets spec.replicas; the scale the API server answered with.
    pub async fn set(&self, target: &ScaleTarget, replicas: u32) -> Result<Scale, String> {
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
            KubeClient::parse(StatusCode::OK, ok),
            Ok(Scale { spec: 5, status: 3 })
        );
        let forbidden = br#"{"kind":"Status","message":"deployments.apps \"llama\" is forbidden"}"#;
        let error = KubeClient::parse(StatusCode::FORBIDDEN, forbidden).unwrap_err();
        assert!(
            error.contains("403") && error.contains("forbidden"),
            "{error}"
        );
    }
}
