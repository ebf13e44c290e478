//! Cache: looks the request up, joins an identical miss already at the
//! engine, and prepares the capture of the engine's answer.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, header};
use infermesh_runtime::http::{Body, full};

use super::Gateway;
use super::resolve::Target;
use crate::access::Principal;
use crate::access_log::AccessRecord;
use crate::cache::{self, CACHE_HEADER, Decision, Flight, Joined, Lookup, ResponseCache};
use crate::error::ApiError;
use crate::quota::{Ask, Used};
use crate::request::Parsed;

/// What the cache stage decided.
pub(crate) enum Cached {
    /// Answered from the cache.
    Hit(Response<Body>),
    /// Goes to the engine; its answer may be captured.
    Miss(Capture),
}

/// How the engine's answer is kept, if it is.
#[derive(Default)]
pub(crate) struct Capture {
    /// The cache and keys to store the answer under, when it is stored.
    pub store: Option<(Arc<ResponseCache>, Lookup)>,
    /// Identical requests waiting on this one's answer.
    pub flight: Option<Flight>,
}

impl Gateway {
    /// Runs the cache stage for `request` served by `target`.
    pub(crate) async fn lookup(
        &self,
        headers: &http::HeaderMap,
        request: &Parsed<'_>,
        target: &Target,
        principal: Option<&Principal>,
        record: &mut AccessRecord,
    ) -> Result<Cached, ApiError> {
        let Some(cache) = &self.cache else {
            return Ok(Cached::Miss(Capture::default()));
        };
        let route = &target.route;
        // An adapter's answers are its own, version by version.
        let model = match &target.adapter {
            Some(adapter) => {
                std::borrow::Cow::Owned(format!("{}+{}", route.model, adapter.resident))
            }
            None => std::borrow::Cow::Borrowed(route.model.as_str()),
        };
        let decision = cache.decide(
            headers,
            request,
            route.cache.as_ref(),
            principal.map_or("", |p| &*p.cache_scope),
            &model,
            route.upstreams.iter().map(|u| u.fingerprint.as_str()),
        );
        let lookup = match decision {
            Decision::Off => return Ok(Cached::Miss(Capture::default())),
            Decision::Bypass => {
                record.cache = "bypass";
                return Ok(Cached::Miss(Capture::default()));
            }
            Decision::Use(lookup) => lookup,
        };
        record.cache = if lookup.lookup { "miss" } else { "bypass" };
        let mut capture = Capture::default();
        if lookup.lookup {
            let mut cached = cache.get(&lookup).await;
            // Identical misses wait for one engine answer (one fingerprint
            // only: during a rollout each replica's answer is its own).
            if let (None, [(_, key)]) = (&cached, lookup.keys.as_slice()) {
                match cache.join(key) {
                    Joined::Leader(leader) => capture.flight = Some(leader),
                    Joined::Follower(rx) => cached = cache.follow(rx).await,
                }
            }
            if let Some(answer) = cached {
                return self
                    .serve_cached(answer, request, principal, record)
                    .await
                    .map(Cached::Hit);
            }
        }
        if lookup.store {
            capture.store = Some((cache.clone(), lookup));
        }
        Ok(Cached::Miss(capture))
    }

    /// Answers from the cache: as stored, or replayed as a stream. The
    /// request counts against the caller's request limits, not its tokens.
    async fn serve_cached(
        &self,
        answer: Bytes,
        request: &Parsed<'_>,
        principal: Option<&Principal>,
        record: &mut AccessRecord,
    ) -> Result<Response<Body>, ApiError> {
        let model = record.served_model.as_deref().unwrap_or("");
        // A cached answer costs no tokens: only the request is counted.
        let admission = self
            .admit_counted(principal, model, &Ask::tokens(0, Some(0)))
            .await?;
        let (body, content_type) = if request.stream {
            let value: serde_json::Value =
                serde_json::from_slice(&answer).map_err(|e| ApiError::UpstreamFailed {
                    endpoint: "cache".into(),
                    reason: format!("cached answer is not JSON: {e}"),
                })?;
            (
                cache::replay::to_sse(&value, request.endpoint, request.include_usage),
                "text/event-stream",
            )
        } else {
            (answer, "application/json")
        };
        let mut response = Response::new(full(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        headers.insert(CACHE_HEADER, http::HeaderValue::from_static("hit"));
        if let Some(admission) = admission {
            headers.extend(admission.headers.clone());
            admission.settle(Used::NONE);
        }
        record.cache = "hit";
        record.stream = request.stream;
        Ok(response)
    }
}
