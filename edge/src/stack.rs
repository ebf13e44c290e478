//! The edge's request path, assembled in one place, outermost first:
//! panic guard → request id → auth (before any body is read) → body limit
//! → gateway (parse, allowed model, route, rate limit, forward, usage and
//! access log).

use std::convert::Infallible;

use http::{Request, Response};
use infermesh_runtime::http::Body;
use infermesh_runtime::http::RequestBody;
use tower::ServiceBuilder;

use crate::gateway::Gateway;
use crate::layers::auth::AuthLayer;
use crate::layers::body_limit::BodyLimitLayer;
use crate::layers::catch_panic::CatchPanicLayer;
use crate::layers::request_id::RequestIdLayer;

/// The full request path over `gateway`.
pub fn build(
    gateway: Gateway,
    auth: AuthLayer,
    max_body_bytes: usize,
    panics: CatchPanicLayer,
) -> impl tower::Service<
    Request<RequestBody>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        .layer(panics)
        .layer(RequestIdLayer)
        .layer(auth)
        .layer(BodyLimitLayer::new(max_body_bytes))
        .service(gateway)
}
