//! The innermost service of the edge: dispatches probes and `/v1/models`,
//! and for inference calls parses the routing fields, picks a replica of
//! the model in this region and forwards to it.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use infermesh_runtime::discovery::Applied;
use infermesh_runtime::http::{Body, full};
use serde_json::json;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::forward::Forwarder;
use crate::openai;
use crate::table::EdgeTable;

/// The table the request path reads: `None` until the first push.
pub type Tables = watch::Receiver<Option<Arc<Applied<EdgeTable>>>>;

/// See the module docs.
#[derive(Clone)]
pub struct Gateway {
    tables: Tables,
    forwarder: Forwarder,
}

impl Gateway {
    /// A gateway routing by `tables` through `forwarder`.
    pub fn new(tables: Tables, forwarder: Forwarder) -> Self {
        Self { tables, forwarder }
    }

    fn table(&self) -> Option<Arc<Applied<EdgeTable>>> {
        self.tables.borrow().clone()
    }

    async fn handle(self, request: Request<Bytes>) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path();
        let method = request.method();
        match (method, path) {
            (&Method::GET | &Method::HEAD, "/livez") => {
                Ok(json_response(StatusCode::OK, json!({"status": "alive"})))
            }
            (&Method::GET | &Method::HEAD, "/readyz") => Ok(self.readyz()),
            (&Method::GET, "/v1/models") => self.models(),
            (_, "/livez" | "/readyz" | "/v1/models") => Err(not_allowed(&request)),
            (&Method::POST, _) if openai::Endpoint::from_path(path).is_some() => {
                self.infer(request).await
            }
            (_, _) if openai::Endpoint::from_path(path).is_some() => Err(not_allowed(&request)),
            _ => Err(ApiError::NotFound(format!("{method} {path}"))),
        }
    }

    fn readyz(&self) -> Response<Body> {
        match self.table() {
            Some(table) => json_response(
                StatusCode::OK,
                json!({"status": "ready", "table_version": table.version, "region": table.table.region}),
            ),
            None => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "waiting for the first routing table"}),
            ),
        }
    }

    fn models(&self) -> Result<Response<Body>, ApiError> {
        let table = self.table().ok_or(ApiError::NotReady)?;
        let data: Vec<_> = table
            .table
            .models
            .iter()
            .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "infermesh", "aliases": m.aliases}))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            json!({"object": "list", "data": data}),
        ))
    }

    async fn infer(self, request: Request<Bytes>) -> Result<Response<Body>, ApiError> {
        let table = self.table().ok_or(ApiError::NotReady)?;
        let (parts, body) = request.into_parts();
        let fields = openai::routing_fields(&body)?;
        let route = table
            .table
            .route(&fields.model)
            .ok_or_else(|| ApiError::ModelNotFound(fields.model.clone()))?;
        let upstream = route
            .pick()
            .cloned()
            .ok_or_else(|| ApiError::NoHealthyReplica(route.model.clone()))?;
        tracing::debug!(model = %route.model, endpoint = %upstream.id, stream = fields.stream, "routing");
        self.forwarder.forward(parts, body, upstream).await
    }
}

fn not_allowed(request: &Request<Bytes>) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

impl tower::Service<Request<Bytes>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let gateway = self.clone();
        Box::pin(async move {
            Ok(gateway.handle(request).await.unwrap_or_else(|error| {
                if error.status().is_server_error() {
                    tracing::warn!(%error, "request failed");
                }
                error.into_response()
            }))
        })
    }
}
