//! Kubernetes service-account tokens as bootstrap credentials: a pod sends
//! its projected token (audience `infermesh` by default) to
//! `IdentityService.Issue`; the API server vouches for it (TokenReview),
//! names the pod it was issued to, and the pod's own annotations say what
//! identity it gets:
//!
//! - `infermesh.io/pool` and `infermesh.io/region` (the webhook's
//!   injection annotations): `sidecar/<region>/<pool>/<pod name>`;
//! - `infermesh.io/edge-region`: `edge/<region>`.
//!
//! The pod must still exist with the uid the token was bound to, so a
//! token of a deleted pod gets nothing. Whoever may create pods with these
//! annotations may obtain these identities: the same trust the sidecar
//! injection already places in them.

use infermesh_runtime::tls::{PeerIdentity, PeerRole};
use tonic::Status;

use crate::autoscale::kube::KubeClient;

/// The annotation naming an edge pod's region.
pub const EDGE_REGION: &str = "infermesh.io/edge-region";

/// Checks service-account tokens against the API server.
pub struct TokenReviewer {
    client: KubeClient,
    audience: String,
}

/// Who the API server says a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub pod: String,
    /// Uid of the pod.
    pub uid: String,
}

impl TokenReviewer {
    /// Reviews tokens through `client`, requiring `audience`.
    pub fn new(client: KubeClient, audience: String) -> Self {
        Self { client, audience }
    }

    /// The identity the pod holding `token` gets; `endpoint_id`, when the
    /// caller names one, must be the pod's name.
    pub async fn identity_for(
        &self,
        token: &str,
        endpoint_id: &str,
    ) -> Result<PeerIdentity, Status> {
        let reviewed = self.review(token).await?;
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            reviewed.namespace, reviewed.pod
        );
        let (status, body) = self
            .client
            .call(http::Method::GET, &path, None)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if status == http::StatusCode::NOT_FOUND {
            return Err(Status::permission_denied(format!(
                "pod {}/{} no longer exists",
                reviewed.namespace, reviewed.pod
            )));
        }
        if !status.is_success() {
            return Err(Status::unavailable(format!(
                "reading pod {}/{}: the Kubernetes API answered {status}",
                reviewed.namespace, reviewed.pod
            )));
        }
        let pod: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Status::unavailable(format!("the Kubernetes API sent no pod: {e}")))?;
        pod_identity(&pod, &reviewed, endpoint_id)
    }

    async fn review(&self, token: &str) -> Result<Reviewed, Status> {
        let request = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let (status, body) = self
            .client
            .call(
                http::Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(request.to_string().into_bytes()),
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !status.is_success() {
            return Err(Status::unavailable(format!(
                "TokenReview: the Kubernetes API answered {status}"
            )));
        }
        let review: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            Status::unavailable(format!("TokenReview: no review in the answer: {e}"))
        })?;
        reviewed(&review, &self.audience)
    }
}

/// The pod a TokenReview answer vouches for.
fn reviewed(review: &serde_json::Value, audience: &str) -> Result<Reviewed, Status> {
    let status = &review["status"];
    if status["authenticated"] != true {
        let why = status["error"].as_str().unwrap_or("not authenticated");
        return Err(Status::permission_denied(format!(
            "service-account token refused: {why}"
        )));
    }
    let audiences = status["audiences"].as_array();
    if !audiences.is_some_and(|a| a.iter().any(|v| v == audience)) {
        return Err(Status::permission_denied(format!(
            "service-account token is not for audience {audience:?}"
        )));
    }
    let user = &status["user"];
    let username = user["username"].as_str().unwrap_or_default();
    let namespace = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .map(|(namespace, _)| namespace.to_string())
        .ok_or_else(|| {
            Status::permission_denied(format!("{username:?} is not a service account"))
        })?;
    let extra = |key: &str| {
        user["extra"][key][0]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let (Some(pod), Some(uid)) = (
        extra("authentication.kubernetes.io/pod-name"),
        extra("authentication.kubernetes.io/pod-uid"),
    ) else {
        return Err(Status::permission_denied(
            "the service-account token is not bound to a pod (use a projected token)",
        ));
    };
    Ok(Reviewed {
        namespace,
        pod,
        uid,
    })
}

/// The identity `pod` (the API server's object) gets.
fn pod_identity(
    pod: &serde_json::Value,
    reviewed: &Reviewed,
    endpoint_id: &str,
) -> Result<PeerIdentity, Status> {
    if pod["metadata"]["uid"].as_str() != Some(reviewed.uid.as_str()) {
        return Err(Status::permission_denied(format!(
            "pod {}/{} is not the pod the token was issued to",
            reviewed.namespace, reviewed.pod
        )));
    }
    let annotation = |name: &str| {
        pod["metadata"]["annotations"][name]
            .as_str()
            .filter(|v| !v.is_empty())
    };
    let invalid = |e: infermesh_runtime::tls::IdentityError| {
        Status::permission_denied(format!(
            "pod {}/{}: its annotations name no usable identity: {e}",
            reviewed.namespace, reviewed.pod
        ))
    };
    match (
        annotation(EDGE_REGION),
        annotation("infermesh.io/pool"),
        annotation("infermesh.io/region"),
    ) {
        (Some(region), None, _) => PeerIdentity::new(PeerRole::Edge, region).map_err(invalid),
        (None, Some(pool), Some(region)) => {
            if !endpoint_id.is_empty() && endpoint_id != reviewed.pod {
                return Err(Status::permission_denied(format!(
                    "endpoint_id {endpoint_id:?}: a pod's sidecar is named after its pod, {:?}",
                    reviewed.pod
                )));
            }
            PeerIdentity::sidecar(region, pool, reviewed.pod.as_str()).map_err(invalid)
        }
        _ => Err(Status::permission_denied(format!(
            "pod {}/{} has neither {EDGE_REGION} nor infermesh.io/pool and infermesh.io/region",
            reviewed.namespace, reviewed.pod
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(authenticated: bool, audiences: &[&str], pod: Option<&str>) -> serde_json::Value {
        let mut extra = json!({});
        if let Some(pod) = pod {
            extra = json!({"authentication.kubernetes.io/pod-name": [pod],
                           "authentication.kubernetes.io/pod-uid": ["uid-1"]});
        }
        json!({"status": {"authenticated": authenticated, "audiences": audiences,
            "user": {"username": "system:serviceaccount:gpu:vllm", "extra": extra}}})
    }

    #[test]
    fn only_an_authenticated_pod_bound_token_for_our_audience_passes() {
        let ok = reviewed(&review(true, &["infermesh"], Some("vllm-0")), "infermesh").unwrap();
        assert_eq!(
            ok,
            Reviewed {
                namespace: "gpu".into(),
                pod: "vllm-0".into(),
                uid: "uid-1".into()
            }
        );
        for (bad, why) in [
            (review(false, &["infermesh"], Some("vllm-0")), "refused"),
            (review(true, &["kubernetes"], Some("vllm-0")), "audience"),
            (review(true, &["infermesh"], None), "not bound to a pod"),
        ] {
            let error = reviewed(&bad, "infermesh").unwrap_err();
            assert_eq!(error.code(), tonic::Code::PermissionDenied);
            assert!(error.message().contains(why), "{}", error.message());
        }
    }

    #[test]
    fn a_pods_annotations_name_its_identity() {
        let who = Reviewed {
            namespace: "gpu".into(),
            pod: "vllm-0".into(),
            uid: "uid-1".into(),
        };
        let pod = |uid: &str, annotations: serde_json::Value| json!({"metadata": {"uid": uid, "annotations": annotations}});
        let sidecar = pod(
            "uid-1",
            json!({"infermesh.io/pool": "llama-eu", "infermesh.io/region": "eu-west"}),
        );
        assert_eq!(
            pod_identity(&sidecar, &who, "").unwrap().to_string(),
            "sidecar/eu-west/llama-eu/vllm-0"
        );
        assert!(pod_identity(&sidecar, &who, "vllm-9").is_err());
        let edge = pod("uid-1", json!({EDGE_REGION: "eu-west"}));
        assert_eq!(
            pod_identity(&edge, &who, "").unwrap().to_string(),
            "edge/eu-west"
        );
        let replaced = pod("uid-2", json!({EDGE_REGION: "eu-west"}));
        assert!(pod_identity(&replaced, &who, "").is_err());
        assert!(pod_identity(&pod("uid-1", json!({})), &who, "").is_err());
    }
}
