//! The mesh listener's gate: a request gets through only when the client
//! certificate it came with (verified against the mesh CA during the
//! handshake) names an edge. Peer edges send spilled-over requests here;
//! a sidecar's or anyone else's certificate gets 403. The request then
//! meets the same stack as a client's, API key check included.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, Either};
use http::{Request, Response, StatusCode, header};
use infermesh_runtime::http::{Body, DISCARD_LIMIT, discard_body, full};
use infermesh_runtime::tls::{PeerIdentity, PeerRole};

/// Wraps the edge's stack for the mesh listener.
#[derive(Clone)]
pub struct EdgesOnly<S>(pub S);

impl<S, B> tower::Service<Request<B>> for EdgesOnly<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let peer = request.extensions().get::<PeerIdentity>();
        if peer.is_some_and(|p| p.role == PeerRole::Edge) {
            return Either::Left(self.0.call(request));
        }
        let who = peer.map_or_else(|| "no client certificate".to_string(), |p| p.to_string());
        tracing::warn!(peer = %who, "mesh listener: request refused, not from an edge");
        let body = serde_json::json!({"error": {
            "message": format!("the mesh listener serves only peer edges (caller: {who})"),
            "type": "permission_error", "param": null, "code": "edge_identity_required"}});
        let response = Response::builder()
            .status(StatusCode::FORBIDDEN)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body.to_string()))
            .unwrap_or_else(|_| Response::new(full("forbidden")));
        Either::Right(Box::pin(async move {
            discard_body(request.into_body(), DISCARD_LIMIT).await;
            Ok(response)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn only_an_edge_identity_reaches_the_stack() {
        let inner = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(full("served")))
        });
        let request = |peer: Option<PeerIdentity>| {
            let mut request = Request::new(full("{}"));
            if let Some(peer) = peer {
                request.extensions_mut().insert(peer);
            }
            request
        };
        let edge = PeerIdentity::new(PeerRole::Edge, "us-east").unwrap();
        let sidecar = PeerIdentity::sidecar("us-east", "p", "e").unwrap();
        let served = EdgesOnly(inner).oneshot(request(Some(edge))).await.unwrap();
        assert_eq!(served.status(), StatusCode::OK);
        for peer in [Some(sidecar), None] {
            let refused = EdgesOnly(inner).oneshot(request(peer)).await.unwrap();
            assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        }
    }
}
