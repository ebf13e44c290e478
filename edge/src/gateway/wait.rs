//! Wait: a request to a model with a queue deadline (`timeouts.queue_ms`)
//! takes its turn when every replica is full (`crate::flow`), in its
//! priority band, fairly among tenants. A request may lower its band with
//! `x-infermesh-priority`, never raise it.

use std::sync::Arc;
use std::time::Duration;

use super::Gateway;
use super::resolve::Target;
use crate::access::Principal;
use crate::error::ApiError;
use crate::flow::{Band, FlowObserver, Queue, Shed, Ticket};
use crate::metrics::Observer;
use crate::request::Parsed;

/// The header a request lowers its priority band with.
pub const PRIORITY_HEADER: &str = "x-infermesh-priority";

/// A queue's metrics, labelled with its model.
struct QueueMetrics {
    model: String,
    observer: Observer,
}

impl FlowObserver for QueueMetrics {
    fn depth(&self, band: Band, tenant: &str, depth: usize) {
        if let Some(metrics) = self.observer.metrics() {
            metrics.queue_depth(&self.model, band.as_str(), tenant, depth);
        }
    }

    fn waited(&self, band: Band, tenant: &str, waited: Duration) {
        if let Some(metrics) = self.observer.metrics() {
            metrics.queue_waited(&self.model, band.as_str(), tenant, waited.as_secs_f64());
        }
    }

    fn shed(&self, band: Band, tenant: &str, why: Shed) {
        if let Some(metrics) = self.observer.metrics() {
            metrics.shed(&self.model, band.as_str(), tenant, why.as_str());
        }
    }
}

/// The band a request runs in: its caller's, or lower when its header asks.
pub(crate) fn band(principal: Option<&Principal>, headers: &http::HeaderMap) -> Band {
    let allowed = principal.map_or(Band::Standard, |p| p.band);
    let asked = headers
        .get(PRIORITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(Band::parse);
    // Bands order most urgent first: the later of the two is the lower.
    asked.map_or(allowed, |asked| asked.max(allowed))
}

impl Gateway {
    /// Takes the request's turn on `target`'s model, when the model has a
    /// queue deadline; the ticket is held until the answer ends.
    pub(crate) async fn wait_turn(
        &self,
        target: &Target,
        request: &Parsed<'_>,
        principal: Option<&Principal>,
        head: &http::request::Parts,
    ) -> Result<Option<Ticket>, ApiError> {
        let headers = &head.headers;
        let route = &target.route;
        let Some(deadline) = route
            .timeouts
            .as_ref()
            .map(|t| t.queue_ms)
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms)))
        else {
            return Ok(None);
        };
        let queue = self
            .queues
            .entry(route.model.clone())
            .or_insert_with(|| {
                let observer: Arc<dyn FlowObserver> = Arc::new(QueueMetrics {
                    model: route.model.clone(),
                    observer: self.observer.clone(),
                });
                Queue::new(Some(observer))
            })
            .clone();
        let tenant = principal.map_or("", |p| p.key.tenant.as_str());
        let output = request.max_output_tokens.unwrap_or(0) * request.n.max(1);
        let band = band(principal, headers);
        // A streamed request held here gets keep-alives past their interval.
        let _waiting = head
            .extensions
            .get::<super::keepalive::Hold>()
            .and_then(|hold| hold.waiting(request.stream));
        queue
            .enter(
                route,
                band,
                tenant,
                request.prompt_tokens_estimate,
                output,
                deadline,
            )
            .await
            .map(Some)
            .map_err(|why| ApiError::Overloaded {
                model: route.model.clone(),
                why: match why {
                    Shed::Sheddable => "every replica is full and sheddable requests are not held",
                    Shed::Timeout => "no replica had room within the model's queue deadline",
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_lowers_the_band_and_never_raises_it() {
        let header = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(PRIORITY_HEADER, value.parse().unwrap());
            headers
        };
        assert_eq!(band(None, &http::HeaderMap::new()), Band::Standard);
        assert_eq!(band(None, &header("sheddable")), Band::Sheddable);
        assert_eq!(
            band(None, &header("critical")),
            Band::Standard,
            "not raised"
        );
        assert_eq!(band(None, &header("nonsense")), Band::Standard);
    }
}
