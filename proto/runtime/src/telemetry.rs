//! Logging and tracing set-up shared by the three processes.
//!
//! - Logs: `RUST_LOG` filters, and `INFERMESH_LOG_FORMAT=json` switches to
//!   one JSON object per line on stderr.
//! - Traces: OpenTelemetry spans exported over OTLP/gRPC when the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//!   is set and `OTEL_TRACES_EXPORTER` is not `none`; `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` and the
//!   `OTEL_BSP_*` batch settings apply as the specification says. Spans of
//!   infermesh's own crates are exported whatever `RUST_LOG` says.
//! - Context crosses processes as W3C `traceparent`/`tracestate` headers.

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Owns the trace exporter; `shutdown` flushes what is still buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(error) = provider.shutdown() {
                    eprintln!("trace exporter shutdown: {error}");
                }
            })
            .await;
        }
    }
}

/// Whether the OTEL_* variables ask for OTLP trace export.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let exporter = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_default();
    let disabled = exporter
        .split(',')
        .any(|e| e.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber (and the trace exporter when asked for);
/// `default_filter` applies when `RUST_LOG` is unset, `service` names the
/// process unless `OTEL_SERVICE_NAME` does. Call inside a tokio runtime.
pub fn init(default_filter: &str, service: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("INFERMESH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Log lines carry their spans' fields only when debugging: formatting
    // every request's span fields for lines that are never written costs
    // more than anything else the request path does.
    let verbose = filter
        .max_level_hint()
        .is_some_and(|level| level >= tracing_subscriber::filter::LevelFilter::DEBUG);
    let spans_too = tracing_subscriber::filter::filter_fn(move |meta| meta.is_event() || verbose);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .with_filter(spans_too)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .with_filter(spans_too)
            .boxed()
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = if otlp_requested() {
        match exporter(service) {
            Ok(provider) => Some(provider),
            Err(error) => {
                eprintln!("OTLP trace export disabled: {error}");
                None
            }
        }
    } else {
        None
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("infermesh"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && meta.target().starts_with("infermesh")
            }))
    });
    // Without trace export or debug logs nobody reads a span: none is made.
    let no_spans = (traces.is_none() && !verbose)
        .then(|| tracing_subscriber::filter::filter_fn(|meta| meta.is_event()));
    // A second init (tests that start several servers in one process) is harmless.
    let _ = tracing_subscriber::registry()
        .with(no_spans)
        .with(logs)
        .with(traces)
        .try_init();
    Telemetry { provider }
}

fn exporter(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

struct HeaderReader<'a>(&'a HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderWriter<'a>(&'a mut HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the trace context the caller sent in `headers`, if any.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    let context = TraceContextPropagator::new().extract(&HeaderReader(headers));
    let _ = span.set_parent(context);
}

/// Writes `span`'s trace context into `headers` (`traceparent`), so the next
/// hop continues the trace; leaves them alone when tracing is off.
pub fn propagate(span: &tracing::Span, headers: &mut HeaderMap) {
    let context = span.context();
    use opentelemetry::trace::TraceContextExt as _;
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HeaderWriter(headers));
    }
}
