//! The HTTP surface: OpenAI routes, `/health`, `/metrics`, `/v1/models`,
//! and `/sim/*` controls that let tests flip health and error rate at run
//! time and read back the last request body exactly as it arrived. Streams are SSE, one event per token as it is decoded.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{self, ApiError, Kind};
use crate::engine::{Engine, Event, Fate, Heard};
use crate::metrics;

type Body = BoxBody<Bytes, Infallible>;

const MAX_BODY: usize = 32 * 1024 * 1024;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        &e.body(),
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn query_value<'a>(request: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// Serves `engine` on `listener` until `shutdown` resolves.
pub async fn serve(engine: Arc<Engine>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let engine = engine.clone();
                async move {
                    let mut response = handle(engine, request).await;
                    // As vLLM's server (uvicorn) does.
                    response.headers_mut().insert(
                        http::header::SERVER,
                        http::HeaderValue::from_static("uvicorn"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(engine: Arc<Engine>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    match (request.method().clone(), path.as_str()) {
        (Method::GET, "/health") => {
            let status = if engine.healthy.load(Ordering::Relaxed) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut r = Response::new(full(""));
            *r.status_mut() = status;
            r
        }
        (Method::GET, "/metrics") => {
            let mut r = Response::new(full(metrics::render(&engine)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Method::GET, "/v1/models") => {
            let mut data = vec![
                json!({"id": engine.config.model, "object": "model", "created": now_secs(), "owned_by": "vllm", "max_model_len": engine.config.max_model_len}),
            ];
            data.extend(engine.loras.models(&engine.config.model, now_secs()));
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        // vLLM's paths, and SGLang's without `/v1`.
        (
            Method::POST,
            "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter"
            | "/load_lora_adapter"
            | "/unload_lora_adapter",
        ) if engine.config.enable_lora => {
            let body = match read_body(request).await {
                Ok(b) => b,
                Err(e) => return error_response(&e),
            };
            let answer = if path.ends_with("/load_lora_adapter") {
                engine.loras.load(&engine.config, &body).await
            } else {
                engine.loras.unload(&body)
            };
            match answer {
                Ok(text) => Response::new(full(text)),
                Err(e) => error_response(&api::ApiError {
                    status: e.status,
                    message: e.message,
                    param: None,
                    code: None,
                }),
            }
        }
        (Method::POST, "/v1/chat/completions") => generate(engine, request, Kind::Chat).await,
        (Method::POST, "/v1/completions") => generate(engine, request, Kind::Completion).await,
        (Method::POST, "/v1/responses") => generate(engine, request, Kind::Responses).await,
        (Method::POST, "/v1/messages") => generate(engine, request, Kind::Messages).await,
        (
            Method::POST,
            "/v1/rerank" | "/rerank" | "/v2/rerank" | "/v1/score" | "/score" | "/tokenize"
            | "/detokenize",
        ) => match (traceparent(&request), read_body(request).await) {
            (traceparent, Ok(body)) => {
                engine.remember_request(&body, traceparent);
                match crate::extras::answer(&path, &body, &engine.config) {
                    Ok(v) => json_response(StatusCode::OK, &v),
                    Err(e) => error_response(&e),
                }
            }
            (_, Err(e)) => error_response(&e),
        },
        (Method::POST, "/v1/embeddings") => match (traceparent(&request), read_body(request).await)
        {
            (traceparent, Ok(body)) => {
                engine.remember_request(&body, traceparent);
                match api::embeddings(&body, &engine.config.model) {
                    Ok(v) => json_response(StatusCode::OK, &v),
                    Err(e) => error_response(&e),
                }
            }
            (_, Err(e)) => error_response(&e),
        },
        (Method::GET, "/sim/last-request") => {
            let (body, heard) = engine.last_request();
            let mut r = Response::new(full(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            if let Some(value) = heard
                .traceparent
                .and_then(|t| http::HeaderValue::from_str(&t).ok())
            {
                r.headers_mut().insert("x-sim-traceparent", value);
            }
            if let Ok(value) = http::HeaderValue::from_str(&heard.credentials) {
                r.headers_mut().insert("x-sim-credential-headers", value);
            }
            r
        }
        (Method::POST, "/sim/health") => {
            match query_value(&request, "healthy").map(str::parse::<bool>) {
                Some(Ok(healthy)) => {
                    engine.healthy.store(healthy, Ordering::Relaxed);
                    json_response(StatusCode::OK, &json!({"healthy": healthy}))
                }
                _ => error_response(&ApiError::bad("healthy", "expected ?healthy=true|false")),
            }
        }
        (Method::POST, "/sim/fail") => {
            match query_value(&request, "error_rate").map(str::parse::<f64>) {
                Some(Ok(rate)) if (0.0..=1.0).contains(&rate) => {
                    engine.set_error_rate(rate);
                    json_response(StatusCode::OK, &json!({"error_rate": rate}))
                }
                _ => error_response(&ApiError::bad(
                    "error_rate",
                    "expected ?error_rate=<fraction in [0, 1]>",
                )),
            }
        }
        (
            _,
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/v1/responses"
            | "/v1/messages"
            | "/v1/rerank"
            | "/rerank"
            | "/v2/rerank"
            | "/v1/score"
            | "/score"
            | "/tokenize"
            | "/detokenize"
            | "/sim/last-request"
            | "/sim/health"
            | "/sim/fail",
        ) => error_response(&ApiError {
            status: 405,
            message: format!("method not allowed on {path}"),
            param: None,
            code: None,
        }),
        // As vLLM's FastAPI server answers a path it does not have.
        _ => json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"})),
    }
}

/// The W3C `traceparent` header a request carried, as vLLM reads it.
/// What the engine remembers of a request's headers: its traceparent, and
/// the names (never the values) of credential headers that reached it.
fn traceparent(request: &Request<Incoming>) -> Heard {
    Heard {
        traceparent: request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        credentials: ["authorization", "x-api-key", "proxy-authorization"]
            .into_iter()
            .filter(|name| request.headers().contains_key(*name))
            .collect::<Vec<_>>()
            .join(","),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError {
            status: 400,
            message: format!("could not read the body: {e}"),
            param: None,
            code: None,
        })
}

async fn generate(engine: Arc<Engine>, request: Request<Incoming>, kind: Kind) -> Response<Body> {
    let traceparent = traceparent(&request);
    let body = match read_body(request).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    engine.remember_request(&body, traceparent);
    // A loaded adapter is served under its own name.
    let adapter = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
        .filter(|m| *m != engine.config.model && engine.loras.is_loaded(m));
    let served = adapter
        .clone()
        .unwrap_or_else(|| engine.config.model.clone());
    let generation = match api::parse_generation(kind, &body, &served, engine.config.max_model_len)
    {
        Ok(g) => g,
        Err(e) => return error_response(&e),
    };
    match engine.accept() {
        Fate::Serve => {}
        Fate::Fail => {
            return error_response(&ApiError {
                status: 500,
                message: "injected engine failure".into(),
                param: None,
                code: Some("internal_error"),
            });
        }
        // Holds no slot; ends when the client gives up and the connection closes.
        Fate::Hang => std::future::pending::<()>().await,
    }
    let (tx, mut events) = mpsc::channel(64);
    let prompt_tokens = generation.tokens.len();
    let choices = generation.choices;
    tokio::spawn(engine.clone().generate(
        generation.tokens,
        generation.max_tokens,
        choices,
        adapter,
        tx,
    ));
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
        Kind::Responses => "resp",
        Kind::Messages => "msg",
    };
    let id = format!("{prefix}-{:032x}", rand::random::<u128>());
    let created = now_secs();
    let model = served;
    if !generation.stream {
        let mut text = String::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Token(t) => text.push_str(&t),
                Event::Done(u) => {
                    return json_response(
                        StatusCode::OK,
                        &api::completion(kind, &id, created, &model, &text, choices, u),
                    );
                }
            }
        }
        return error_response(&ApiError {
            status: 500,
            message: "generation ended early".into(),
            param: None,
            code: None,
        });
    }
    let (frames, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let mut stream = crate::stream::Stream::new(
        kind,
        &id,
        created,
        &model,
        generation.include_usage,
        prompt_tokens,
    )
    .with_choices(choices);
    tokio::spawn(async move {
        let sse = |text: String| Ok(Frame::data(Bytes::from(text)));
        for text in stream.start() {
            if frames.send(sse(text)).await.is_err() {
                return;
            }
        }
        while let Some(event) = events.recv().await {
            let frame = match event {
                Event::Token(t) => sse(stream.token(&t)),
                Event::Done(u) => {
                    for text in stream.done(u) {
                        let _ = frames.send(sse(text)).await;
                    }
                    return;
                }
            };
            // A closed receiver means the client left: dropping `events` stops generation.
            if frames.send(frame).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}
