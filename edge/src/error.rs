//! Every refusal the edge sends, in OpenAI's error shape with the status a
//! client library expects. This is the one place errors become responses.

use std::time::Duration;

use http::{Response, StatusCode, header};
use infermesh_runtime::http::{Body, full};
use serde_json::json;

/// A request the edge cannot serve, and why.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON the endpoint takes.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending field, when one is to blame.
        param: Option<&'static str>,
    },
    /// The body exceeds the configured limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body did not arrive whole within the body deadline.
    #[error("the request body did not arrive within {after:?}")]
    BodyTimeout {
        /// The deadline.
        after: Duration,
    },
    /// No model of that name or alias.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// The model exists but no replica in this region is serving.
    #[error("no healthy replica of model `{0}` is available in this region")]
    NoHealthyReplica(String),
    /// Every replica of the model is full and the request was not let wait
    /// (sheddable) or did not get its turn within the model's queue deadline.
    #[error("model {model:?} is at capacity: {why}; retry later")]
    Overloaded {
        /// The model.
        model: String,
        /// Why it was not served, for the client.
        why: &'static str,
    },
    /// The model's pool had scaled to zero and no replica came up in time.
    #[error(
        "model {model:?} has no replica: pool {pool:?} is scaling up from zero and no replica became ready within {after:?}; retry later"
    )]
    ColdStartTimeout {
        /// Model asked for.
        model: String,
        /// Pool scaling up.
        pool: String,
        /// How long the request waited.
        after: std::time::Duration,
    },
    /// The replica did not answer in time.
    #[error("replica {endpoint} did not answer within {after:?}")]
    UpstreamTimeout {
        /// Endpoint id.
        endpoint: String,
        /// How long we waited.
        after: Duration,
    },
    /// The replica could not be reached or broke the connection.
    #[error("replica {endpoint} failed: {reason}")]
    UpstreamFailed {
        /// Endpoint id.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// The edge holds no routing table yet.
    #[error("the edge has not received a routing table yet")]
    NotReady,
    /// No such path.
    #[error("no route for {0}")]
    NotFound(String),
    /// The engines serving the model do not serve this path.
    #[error("model `{model}` is served by an engine that does not serve {path}")]
    EndpointNotServed {
        /// The model.
        model: String,
        /// The path asked for.
        path: String,
    },
    /// No key, or a key that is unknown, revoked or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// The key may not call this model.
    #[error("API key {key} is not allowed to use model `{model}`")]
    ModelNotAllowed {
        /// The key's visible prefix.
        key: String,
        /// Model asked for.
        model: String,
    },
    /// A rate limit or budget is spent; `headers` tell when to come back.
    #[error("{message}")]
    RateLimited {
        /// Which limit, in the client's words.
        message: String,
        /// `requests`, `tokens` or `insufficient_quota`.
        kind: &'static str,
        /// Retry-After and x-ratelimit-* headers.
        headers: Box<http::HeaderMap>,
    },
    /// The body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Path exists, method does not.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// Method used.
        method: String,
        /// Path asked for.
        path: String,
    },
}

impl ApiError {
    /// Shorthand for a 400 about one field.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// Whether a refusal of this kind spends one of the caller's requests
    /// (a 403 or 404 before admission: an unknown model or path, or a
    /// model the key may not use).
    pub fn counts_as_request(&self) -> bool {
        matches!(
            self,
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed { .. } | ApiError::NotFound(_)
        )
    }

    /// HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::ModelNotFound(_)
            | ApiError::NotFound(_)
            | ApiError::EndpointNotServed { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NoHealthyReplica(_)
            | ApiError::Overloaded { .. }
            | ApiError::NotReady
            | ApiError::ColdStartTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::ModelNotAllowed { .. } => ("permission_error", Some("model_not_allowed")),
            ApiError::RateLimited {
                kind: "insufficient_quota",
                ..
            } => ("insufficient_quota", Some("insufficient_quota")),
            ApiError::RateLimited { kind, .. } => (kind, Some("rate_limit_exceeded")),
            ApiError::UnsupportedMediaType(_) => {
                ("invalid_request_error", Some("unsupported_media_type"))
            }
            ApiError::BodyTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            ApiError::BodyTimeout { .. } => ("invalid_request_error", Some("request_timeout")),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::EndpointNotServed { .. } => {
                ("invalid_request_error", Some("endpoint_not_served"))
            }
            ApiError::MethodNotAllowed { .. } => {
                ("invalid_request_error", Some("method_not_allowed"))
            }
            ApiError::NoHealthyReplica(_) => ("server_error", Some("no_healthy_replica")),
            ApiError::Overloaded { .. } => ("server_error", Some("overloaded")),
            ApiError::ColdStartTimeout { .. } => ("server_error", Some("cold_start_timeout")),
            ApiError::NotReady => ("server_error", Some("not_ready")),
            ApiError::UpstreamTimeout { .. } => ("server_error", Some("upstream_timeout")),
            ApiError::UpstreamFailed { .. } => ("server_error", Some("upstream_failed")),
        }
    }

    /// The error's `code` (or its `type` where it has none), for logs.
    pub fn code(&self) -> &'static str {
        let (kind, code) = self.kind();
        code.unwrap_or(kind)
    }

    /// The message a client sees. Replica failures name neither the
    /// replica nor its address (the access log and traces have both): a
    /// client must not learn the fleet's layout from an error.
    fn public_message(&self) -> String {
        match self {
            ApiError::UpstreamTimeout { after, .. } => {
                format!("the replica serving this request did not answer within {after:?}")
            }
            ApiError::UpstreamFailed { .. } => {
                "the replica serving this request failed before answering; retry".into()
            }
            other => other.to_string(),
        }
    }

    /// The OpenAI-shaped JSON response.
    pub fn into_response(self) -> Response<Body> {
        let (kind, code) = self.kind();
        let param = match &self {
            ApiError::InvalidRequest { param, .. } => *param,
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed { .. } => Some("model"),
            _ => None,
        };
        let body = json!({
            "error": {
                "message": self.public_message(),
                "type": kind,
                "param": param,
                "code": code,
            }
        });
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let ApiError::RateLimited { headers, .. } = &self {
            response.headers_mut().extend((**headers).clone());
        }
        if self.status() == StatusCode::SERVICE_UNAVAILABLE
            || (self.status() == StatusCode::TOO_MANY_REQUESTS
                && !response.headers().contains_key(header::RETRY_AFTER))
        {
            // No replica, or no table yet: worth another try soon, not at once.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::BodyTimeout { .. }) {
            // The rest of the body may still be on its way: the connection
            // cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"infermesh\""),
            );
        }
        if let ApiError::MethodNotAllowed { path, .. } = &self {
            let allow = if path.starts_with("/v1/models") || path.ends_with("z") {
                "GET"
            } else {
                "POST"
            };
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static(allow));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json_of(error: ApiError) -> (StatusCode, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn unknown_model_is_openai_shaped_404() {
        let (status, body) = json_of(ApiError::ModelNotFound("gpt-9".into())).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }

    #[tokio::test]
    async fn unavailability_and_limits_say_when_to_retry() {
        let retry_after = |error: ApiError| {
            error
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            retry_after(ApiError::NoHealthyReplica("m".into())).as_deref(),
            Some("1")
        );
        assert_eq!(retry_after(ApiError::NotReady).as_deref(), Some("1"));
        let mut headers = http::HeaderMap::new();
        headers.insert(header::RETRY_AFTER, http::HeaderValue::from_static("17"));
        let limited = ApiError::RateLimited {
            message: "m".into(),
            kind: "requests",
            headers: Box::new(headers),
        };
        assert_eq!(
            retry_after(limited).as_deref(),
            Some("17"),
            "the limiter's own value stays"
        );
        assert_eq!(retry_after(ApiError::ModelNotFound("m".into())), None);
    }

    #[tokio::test]
    async fn statuses_match_the_failure() {
        assert_eq!(
            json_of(ApiError::invalid("model", "x")).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            json_of(ApiError::BodyTooLarge { limit: 1 }).await.0,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            json_of(ApiError::NoHealthyReplica("m".into())).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let timeout = ApiError::UpstreamTimeout {
            endpoint: "e".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(json_of(timeout).await.0, StatusCode::GATEWAY_TIMEOUT);
        let failed = ApiError::UpstreamFailed {
            endpoint: "e".into(),
            reason: "refused".into(),
        };
        assert_eq!(json_of(failed).await.0, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn replica_failures_name_no_replica_or_address_to_the_client() {
        for error in [
            ApiError::UpstreamTimeout {
                endpoint: "vllm-llama-0".into(),
                after: Duration::from_secs(30),
            },
            ApiError::UpstreamFailed {
                endpoint: "vllm-llama-0".into(),
                reason: "connect to 10.1.2.3:8081 failed".into(),
            },
        ] {
            let logged = error.to_string();
            assert!(
                logged.contains("vllm-llama-0"),
                "logs keep the detail: {logged}"
            );
            let (_, body) = json_of(error).await;
            let shown = body.to_string();
            assert!(
                !shown.contains("vllm-llama") && !shown.contains("10.1.2.3"),
                "{shown}"
            );
        }
    }
}
