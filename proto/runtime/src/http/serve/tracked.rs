//! The service hyper calls: the listener's service, with every request's
//! handler, body and response counted as work on the connection, and the
//! client's address and TLS identity, if any, in every request's extensions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::activity::{Activity, Busy};
use super::{HttpService, RequestBody};
use crate::http::{Body, Guarded};
use crate::tls::PeerIdentity;

/// See the module docs.
pub(super) struct Tracked<S> {
    inner: Arc<S>,
    activity: Arc<Activity>,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
    body_timeout: Duration,
}

/// The address a request's connection came from (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl<S> Tracked<S> {
    /// `inner` on the connection from `peer`, counting its work in
    /// `activity` and giving request bodies `body_timeout` to arrive.
    pub(super) fn new(
        inner: Arc<S>,
        activity: Arc<Activity>,
        peer: SocketAddr,
        identity: Option<PeerIdentity>,
        body_timeout: Duration,
    ) -> Self {
        Self {
            inner,
            activity,
            peer,
            identity,
            body_timeout,
        }
    }
}

impl<S: HttpService> hyper::service::Service<Request<Incoming>> for Tracked<S> {
    type Response = Response<Guarded<Body, Busy>>;
    type Error = Infallible;
    type Future = TrackedCall<S>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.called();
        let answering = self.activity.enter();
        let mut request =
            request.map(|inner| RequestBody::new(inner, self.activity.enter(), self.body_timeout));
        request.extensions_mut().insert(ClientAddr(self.peer));
        if let Some(identity) = &self.identity {
            request.extensions_mut().insert(identity.clone());
        }
        TrackedCall {
            call: S::clone(&self.inner).oneshot(request),
            answering: Some(answering),
        }
    }
}

pin_project_lite::pin_project! {
    /// A handler's future whose response body carries the connection's
    /// work count until it is written out.
    pub(super) struct TrackedCall<S: tower::Service<Request<RequestBody>>> {
        #[pin]
        call: Oneshot<S, Request<RequestBody>>,
        answering: Option<Busy>,
    }
}

impl<S: HttpService> std::future::Future for TrackedCall<S> {
    type Output = Result<Response<Guarded<Body, Busy>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.call.poll(cx))?;
        let answering = this
            .answering
            .take()
            .expect("TrackedCall polled after it completed");
        Poll::Ready(Ok(response.map(|body| Guarded::new(body, answering))))
    }
}
