//! Respond and account: the headers the edge adds to the replica's answer
//! (rate limits, cache outcome, fallback, route receipt), the capture of
//! the answer for the cache, and the usage tap that settles the token
//! reservation and writes the access line when the body ends.

use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use infermesh_runtime::http::Body;
use tokio::time::Instant;

use super::lookup::Capture;
use super::resolve::Target;
use super::{FALLBACK_HEADER, Gateway, ROUTE_HEADER};
use crate::access_log::AccessRecord;
use crate::cache::CACHE_HEADER;
use crate::cache::tap::{CacheTap, Recording};
use crate::metrics::InFlight;
use crate::quota::Admission;
use crate::request::Parsed;
use crate::usage::{Finish, UsageTap};

/// What the answer's bookkeeping needs beyond the answer itself.
pub(crate) struct Books {
    /// The token reservation to settle.
    pub admission: Option<Admission>,
    /// Holds the request in the in-flight gauge until the body ends.
    pub in_flight: Option<InFlight>,
    /// Its turn at a full model, held until the body ends.
    pub ticket: Option<crate::flow::Ticket>,
    /// How the answer is captured for the cache.
    pub capture: Capture,
    /// When the request arrived.
    pub started: Instant,
}

impl Gateway {
    /// The client's response for the replica's `answer`.
    pub(crate) fn respond(
        &self,
        (mut response, fingerprint): super::attempts::Answer,
        target: &Target,
        request: &Parsed<'_>,
        books: Books,
        record: &mut AccessRecord,
    ) -> Response<Body> {
        if let Some(admission) = &books.admission {
            response.headers_mut().extend(admission.headers.clone());
        }
        record.status = response.status().as_u16();
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        annotate(response.headers_mut(), target, record);
        let mut capture = books.capture;
        if let Some((cache, lookup)) = capture.store.take()
            && response.status() == StatusCode::OK
            && let Some(key) = lookup.key_for(&fingerprint)
        {
            let recording = Recording {
                cache,
                key: key.to_string(),
                ttl: lookup.ttl,
                max_bytes: lookup.max_bytes,
                endpoint: request.endpoint,
                sse,
                flight: capture.flight.take(),
            };
            response = response.map(|body| CacheTap::new(body, recording).boxed());
        }
        let strip = request.usage_injected();
        let finish = Finish {
            admission: books.admission,
            record: record.clone(),
            observer: self.observer.clone(),
            in_flight: books.in_flight,
            ticket: books.ticket,
            span: tracing::Span::current(),
            started: books.started,
            failed: !response.status().is_success(),
            prompt_estimate: request.prompt_tokens_estimate,
        };
        // The tap writes the access line when the body ends.
        record.deferred = true;
        response.map(|body| UsageTap::new(body, sse, strip, finish).boxed())
    }
}

/// Adds the cache outcome, the fallback model and the route receipt.
fn annotate(headers: &mut http::HeaderMap, target: &Target, record: &AccessRecord) {
    if record.cache != "none" {
        headers.insert(CACHE_HEADER, http::HeaderValue::from_static(record.cache));
    }
    if let Some(value) = target
        .fallback
        .as_deref()
        .and_then(|f| http::HeaderValue::from_str(f).ok())
    {
        headers.insert(FALLBACK_HEADER, value);
    }
    let route = &target.route;
    if route.receipts {
        let receipt = crate::receipt::render(
            route.policy.as_str(),
            record.endpoint.as_deref().unwrap_or(""),
            &target.table.table.region,
            target.table.version,
            record.retries,
        );
        if let Ok(value) = http::HeaderValue::from_str(&receipt) {
            headers.insert(ROUTE_HEADER, value);
        }
    }
}
