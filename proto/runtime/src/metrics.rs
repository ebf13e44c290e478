//! Prometheus metrics shared by the three processes: a registry with the
//! process collector (CPU, resident memory, open file descriptors), bucket
//! sets that fit LLM latencies, and the `/metrics` listener each process
//! runs on its own port, in the Prometheus text format.

use std::convert::Infallible;
use std::time::Duration;

use crate::http::RequestBody;
use http::{Method, Request, Response, StatusCode, header};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::{Body, ServeOptions, full};

/// End-to-end request latency: a cached answer in milliseconds up to a long
/// generation in minutes.
pub const REQUEST_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Time to first token.
pub const FIRST_TOKEN_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Time per output token (inter-token latency).
pub const PER_TOKEN_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
];
/// Control-plane work: etcd requests, pushes.
pub const CONTROL_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A registry holding the process collector, adding `labels` to every series.
pub fn registry(labels: &[(&str, &str)]) -> Registry {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<std::collections::HashMap<_, _>>();
    let labels = (!labels.is_empty()).then_some(labels);
    // Only invalid label names fail; callers pass fixed, valid ones.
    let registry = Registry::new_custom(None, labels).unwrap_or_default();
    // Only fails when registered twice; a fresh registry cannot.
    let _ = registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    registry
}

/// `registry` in the text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(error) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(%error, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics` from `registry` on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, registry: Registry, cancel: CancellationToken) {
    let service = tower::service_fn(move |request: Request<RequestBody>| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(respond(&registry, &request)) }
    });
    crate::http::serve(
        listener,
        service,
        cancel,
        ServeOptions::plaintext(Duration::from_secs(1)),
    )
    .await;
}

/// Binds `address` and serves metrics there in the background; returns the bound address.
pub async fn spawn(
    address: std::net::SocketAddr,
    registry: Registry,
    cancel: CancellationToken,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, "metrics serving on /metrics");
    Ok((bound, tokio::spawn(serve(listener, registry, cancel))))
}

fn respond<B>(registry: &Registry, request: &Request<B>) -> Response<Body> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(registry),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_includes_process_metrics_and_registered_ones() {
        let registry = registry(&[("region", "eu")]);
        let counter =
            prometheus::IntCounter::new("infermesh_test_total", "A test counter.").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(3);
        let text = render(&registry);
        assert!(
            text.contains("# TYPE infermesh_test_total counter"),
            "{text}"
        );
        assert!(
            text.contains(r#"infermesh_test_total{region="eu"} 3"#),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        let response = respond(&registry, &Request::get("/other").body(()).unwrap());
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = respond(&registry, &Request::post("/metrics").body(()).unwrap());
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
