//! The edge's request path, assembled in one place, outermost first:
//! request id → body limit → gateway (parse, route, forward). Later layers
//! (auth, rate limits, cache) go between the body limit and the gateway.

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use infermesh_runtime::http::Body;
use tower::ServiceBuilder;

use crate::gateway::Gateway;
use crate::layers::body_limit::BodyLimitLayer;
use crate::layers::request_id::RequestIdLayer;

/// The full request path over `gateway`.
pub fn build(
    gateway: Gateway,
    max_body_bytes: usize,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        .layer(RequestIdLayer)
        .layer(BodyLimitLayer::new(max_body_bytes))
        .service(gateway)
}
