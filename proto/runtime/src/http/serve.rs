//! The accept loop every HTTP listener shares: plaintext or TLS, HTTP/1.1
//! and h2 on one port, deadlines against slow clients, and a graceful drain.
//!
//! Plaintext HTTP/1.1 connections hold no buffers between requests. hyper
//! keeps a read and a write buffer (8 KiB each) and its dispatcher for as
//! long as a connection lives, which is most of the memory a keep-alive
//! client costs while it idles. Here a connection whose last request is
//! answered hands its socket back from hyper (with any bytes hyper read
//! ahead) and waits for the next byte with nothing but the socket; the next
//! request gets a fresh hyper connection. This is nginx's keep-alive model
//! (buffers freed between requests).

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::{Body, Guarded, RequestBody};
use crate::tls::PeerIdentity;
use crate::tls::server::ALPN_H2;

/// How a listener treats its connections.
#[derive(Clone)]
pub struct ServeOptions {
    /// Time open connections get to finish once shutdown starts.
    pub grace: Duration,
    /// A client must send its first byte (TLS: finish its handshake), and
    /// then each HTTP/1.1 request's headers, within this time each, or the
    /// connection is closed (slowloris). An idle keep-alive connection is
    /// closed when no request starts within this time of going idle (or of
    /// resting).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 request line and headers, h2 header
    /// list) accepted; HTTP/1.1 requests over it get 431.
    pub max_header_bytes: usize,
    /// Serve TLS through this acceptor instead of plaintext.
    pub tls: Option<TlsAcceptor>,
    /// How long an idle plaintext HTTP/1.1 connection keeps hyper's
    /// buffers before it rests on the bare socket: a client that sends its
    /// next request sooner pays nothing for resting. At most
    /// `max_lingering` idle connections wait like this at a time; others
    /// rest at once.
    pub rest_after: Duration,
    /// Most idle connections that keep their buffers for `rest_after`.
    pub max_lingering: usize,
    /// A request's body must arrive whole within this time of its head;
    /// reading it past then fails with `BodyError::TimedOut` (a trickled
    /// upload cannot hold a connection and its buffers forever).
    pub body_timeout: Duration,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("grace", &self.grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("tls", &self.tls.is_some())
            .field("rest_after", &self.rest_after)
            .field("max_lingering", &self.max_lingering)
            .field("body_timeout", &self.body_timeout)
            .finish()
    }
}

impl ServeOptions {
    /// Smallest `max_header_bytes` accepted (hyper's lower bound on its read buffer).
    pub const MIN_HEADER_BYTES: usize = 8192;

    /// Idle time before a connection rests, unless set otherwise.
    pub const REST_AFTER: Duration = Duration::from_secs(1);

    /// Idle connections that may keep their buffers at once, unless set
    /// otherwise: well under 1 MiB of buffers.
    pub const MAX_LINGERING: usize = 32;

    /// Time a request body gets to arrive, unless set otherwise.
    pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Plaintext with the given grace period, a 30 s header deadline, a
    /// 64 KiB head limit, a 30 s body deadline and up to 32 idle
    /// connections resting after 1 s (any more at once).
    pub fn plaintext(grace: Duration) -> Self {
        Self {
            grace,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            tls: None,
            rest_after: Self::REST_AFTER,
            max_lingering: Self::MAX_LINGERING,
            body_timeout: Self::BODY_TIMEOUT,
        }
    }
}

/// What `serve` serves: a cloneable tower service answering every request
/// with a `Body`, shared across connections and tasks.
pub trait HttpService:
    tower::Service<
        Request<RequestBody>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: tower::Service<
            Request<RequestBody>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `service` on `listener` (HTTP/1.1 and h2) until `cancel` fires,
/// then stops accepting and gives open connections `options.grace` to
/// finish. With `options.tls`, every connection is TLS: ALPN `h2` gets an
/// HTTP/2 connection, anything else HTTP/1.1, and
/// when the client presented a certificate carrying an infermesh identity,
/// each request's extensions hold its `tls::PeerIdentity`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    cancel: CancellationToken,
    options: ServeOptions,
) where
    S: HttpService,
{
    let settings = Arc::new(Settings::new(&options));
    // One copy per listener: connections share it and clone it per request.
    let service = Arc::new(service);
    let grace = options.grace;
    match options.tls {
        None => {
            accept_until_cancelled(listener, cancel, grace, |stream, peer, drain| {
                let (settings, service) = (settings.clone(), service.clone());
                async move { serve_plaintext(stream, peer, service, &settings, drain).await }
            })
            .await
        }
        Some(acceptor) => {
            accept_until_cancelled(listener, cancel, grace, |stream, peer, drain| {
                let (acceptor, settings, service) =
                    (acceptor.clone(), settings.clone(), service.clone());
                async move { serve_tls(stream, peer, acceptor, service, &settings, drain).await }
            })
            .await
        }
    }
}

/// What every connection of one listener is served with.
struct Settings {
    auto: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
    header_read_timeout: Duration,
    body_timeout: Duration,
    rest_after: Duration,
    lingering: Slots,
}

impl Settings {
    /// HTTP/1.1 with a header deadline, a head size limit and keep-alive,
    /// h2 with a stream cap and a header list limit.
    fn new(options: &ServeOptions) -> Self {
        let max_header_bytes = options.max_header_bytes.max(ServeOptions::MIN_HEADER_BYTES);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(max_header_bytes)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(1024);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(max_header_bytes)
            .keep_alive(true);
        Self {
            auto,
            http1,
            header_read_timeout: options.header_read_timeout,
            body_timeout: options.body_timeout,
            rest_after: options.rest_after,
            lingering: Slots::new(options.max_lingering),
        }
    }
}

/// One plaintext connection: h2 (prior knowledge) goes to hyper for its
/// whole life; HTTP/1.1 gets a hyper connection per busy spell and rests on
/// the bare socket in between.
async fn serve_plaintext<S>(
    mut stream: TcpStream,
    peer: SocketAddr,
    service: Arc<S>,
    settings: &Settings,
    drain: CancellationToken,
) where
    S: HttpService,
{
    let activity = Arc::new(Activity::default());
    let mut service = Tracked::new(service, activity.clone(), peer, None, settings.body_timeout);
    let mut head = [0u8; H2_PREFACE.len()];
    let Some(n) = rest(&stream, &mut head, settings.header_read_timeout, &drain).await else {
        return;
    };
    // The h2 preface, or too few bytes to tell: hyper's own detection decides.
    if H2_PREFACE.starts_with(&head[..n]) {
        let connection = settings
            .auto
            .serve_connection(TokioIo::new(stream), service);
        drive(connection, peer, &drain).await;
        return;
    }
    let mut read_ahead = Bytes::new();
    loop {
        let io = TokioIo::new(Resting::new(read_ahead, stream, activity.clone()));
        let mut connection = Box::new(settings.http1.serve_connection(io, service));
        let resting = Some(Rest {
            activity: &activity,
            after: settings.rest_after,
            lingering: &settings.lingering,
        });
        if !until_idle(Pin::new(&mut *connection), resting, peer, &drain).await {
            return;
        }
        let parts = connection.into_parts();
        let resting = parts.io.into_inner();
        (stream, read_ahead) = resting.into_parts(parts.read_buf);
        service = parts.service;
        if read_ahead.is_empty() && !ready(&stream, settings.header_read_timeout, &drain).await {
            return;
        }
    }
}

/// One TLS connection: handshake within the header deadline, then h2 or
/// HTTP/1.1 by ALPN, with the client's identity on every request.
async fn serve_tls<S>(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    service: Arc<S>,
    settings: &Settings,
    drain: CancellationToken,
) where
    S: HttpService,
{
    let handshake_timeout = settings.header_read_timeout;
    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        _ = drain.cancelled() => return,
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, ?handshake_timeout, "TLS handshake timed out");
                return;
            }
        },
    };
    let (_, session) = stream.get_ref();
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let identity = PeerIdentity::from_presented(session.peer_certificates());
    let service = Tracked::new(
        service,
        Arc::new(Activity::default()),
        peer,
        identity,
        settings.body_timeout,
    );
    let io = TokioIo::new(FirstByteDeadline::new(stream, handshake_timeout));
    // h2 over TLS is chosen by ALPN (RFC 9113 §3.2), so anything else is
    // HTTP/1.1, whose header deadline starts at once.
    if h2 {
        let builder = settings.auto.clone().http2_only();
        drive(builder.serve_connection(io, service), peer, &drain).await;
    } else {
        drive(settings.http1.serve_connection(io, service), peer, &drain).await;
    }
}

/// Waits, holding nothing but the socket, until the client sends bytes,
/// and peeks at them (up to `head.len()`, none consumed). None when the
/// client closes, the deadline passes or the listener drains first.
async fn rest(
    stream: &TcpStream,
    head: &mut [u8],
    within: Duration,
    drain: &CancellationToken,
) -> Option<usize> {
    tokio::select! {
        _ = drain.cancelled() => None,
        peeked = tokio::time::timeout(within, stream.peek(head)) => match peeked {
            Ok(Ok(n)) if n > 0 => Some(n),
            _ => None,
        },
    }
}

/// Waits, holding nothing but the socket, until it is readable (bytes, or
/// the client's close, which the next hyper connection reads). Cheaper than
/// `rest` (no system call), for connections whose protocol is known; a
/// spurious wake-up only starts a hyper connection early.
async fn ready(stream: &TcpStream, within: Duration, drain: &CancellationToken) -> bool {
    tokio::select! {
        _ = drain.cancelled() => false,
        ready = tokio::time::timeout(within, stream.readable()) => matches!(ready, Ok(Ok(()))),
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Drives a hyper connection until it ends (false) or, given `rest`, until
/// it can rest (true): every request it took is answered, the answer is
/// written out, nothing is being read for a handler, hyper waits for the
/// next request's bytes, and has waited for the rest delay. A drain asks it
/// to finish what it serves and close.
async fn until_idle<C>(
    mut connection: Pin<&mut C>,
    rest: Option<Rest<'_>>,
    peer: SocketAddr,
    drain: &CancellationToken,
) -> bool
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut drained = std::pin::pin!(drain.cancelled());
    let mut draining = false;
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut slot: Option<Slot<'_>> = None;
    let mut idle_after = 0;
    poll_fn(|cx| {
        if let Some(rest) = &rest {
            rest.activity.waker.register(cx.waker());
        }
        if !draining && drained.as_mut().poll(cx).is_ready() {
            connection.as_mut().graceful_shutdown();
            draining = true;
        }
        match connection.as_mut().poll(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(false),
            Poll::Ready(Err(error)) => {
                tracing::debug!(%peer, %error, "connection ended with an error");
                Poll::Ready(false)
            }
            Poll::Pending => match &rest {
                Some(rest) if !draining && rest.activity.idle() => {
                    if slot.is_none() {
                        slot = rest.lingering.take();
                    }
                    if rest.after.is_zero() || slot.is_none() {
                        return Poll::Ready(true);
                    }
                    // Idle since the last request finished: (re)arm the
                    // timer once per request, rest when it fires.
                    let calls = rest.activity.calls.load(Ordering::Relaxed);
                    let deadline = tokio::time::Instant::now() + rest.after;
                    let timer =
                        linger.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if idle_after != calls {
                        timer.as_mut().reset(deadline);
                        idle_after = calls;
                    }
                    timer.as_mut().poll(cx).map(|()| true)
                }
                _ => {
                    // Busy again: the slot is for idle connections.
                    slot = None;
                    Poll::Pending
                }
            },
        }
    })
    .await
}

/// How a connection rests: what it is doing, how long it may idle with
/// its buffers, and the slots for doing so.
struct Rest<'a> {
    activity: &'a Activity,
    after: Duration,
    lingering: &'a Slots,
}

/// A bounded count of idle connections keeping their buffers.
struct Slots {
    taken: AtomicUsize,
    max: usize,
}

impl Slots {
    fn new(max: usize) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max,
        }
    }

    fn take(&self) -> Option<Slot<'_>> {
        let taken = self.taken.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self))
    }
}

/// One idle connection's place among those keeping their buffers.
struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs a connection to its end, draining it gracefully when asked (boxed,
/// so that the task of a connection that rests is no bigger than resting
/// needs).
async fn drive<C>(connection: C, peer: SocketAddr, drain: &CancellationToken)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    until_idle(Box::pin(connection).as_mut(), None, peer, drain).await;
}

/// What one connection is doing, as far as putting it to rest goes.
#[derive(Default)]
struct Activity {
    /// Handlers running, request bodies open and responses being written.
    busy: AtomicUsize,
    /// Requests taken by the current hyper connection.
    calls: AtomicUsize,
    /// hyper's last read found the socket empty.
    read_waiting: AtomicBool,
    /// hyper's last write or flush could not finish.
    write_blocked: AtomicBool,
    /// A request body was dropped before its end: the current hyper
    /// connection serves to its end instead of resting.
    unread_body: AtomicBool,
    /// The connection's task, woken when the last unit of work ends
    /// elsewhere (a request body read to its end by another task).
    waker: AtomicWaker,
}

impl Activity {
    fn idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
            && self.calls.load(Ordering::Relaxed) > 0
            && self.read_waiting.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
            && !self.unread_body.load(Ordering::Relaxed)
    }

    fn enter(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

/// One unit of work open on a connection; done when dropped.
pub(super) struct Busy(Arc<Activity>);

impl Busy {
    /// The handler dropped its request body before the end: hyper drains
    /// or closes it after the answer, and until then the connection
    /// cannot rest.
    pub(super) fn left_unread(&self) {
        self.0.unread_body.store(true, Ordering::Relaxed);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake();
        }
    }
}

/// The service hyper calls: the listener's service, with every request's
/// handler, body and response counted as work on the connection, and the
/// client's address and TLS identity, if any, in every request's extensions.
struct Tracked<S> {
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
    fn new(
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
        self.activity.calls.fetch_add(1, Ordering::Relaxed);
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
    struct TrackedCall<S: tower::Service<Request<RequestBody>>> {
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

/// The socket under a hyper HTTP/1.1 connection: first the bytes a previous
/// hyper connection read ahead, then the socket; reports to `Activity`
/// whether hyper's reads find nothing and whether its writes got through.
struct Resting {
    read_ahead: Bytes,
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Resting {
    /// Starts a hyper connection's spell: nothing served, read or written yet.
    fn new(read_ahead: Bytes, stream: TcpStream, activity: Arc<Activity>) -> Self {
        activity.calls.store(0, Ordering::Relaxed);
        activity.read_waiting.store(false, Ordering::Relaxed);
        activity.write_blocked.store(false, Ordering::Relaxed);
        activity.unread_body.store(false, Ordering::Relaxed);
        Self {
            read_ahead,
            stream,
            activity,
        }
    }

    /// The socket, and every byte read from it that no request consumed:
    /// hyper's unparsed `buffered` followed by what it never took from here.
    fn into_parts(self, buffered: Bytes) -> (TcpStream, Bytes) {
        // Copied, never kept: `buffered` shares hyper's whole read buffer.
        let read_ahead = if buffered.is_empty() && self.read_ahead.is_empty() {
            Bytes::new()
        } else {
            let mut joined = BytesMut::with_capacity(buffered.len() + self.read_ahead.len());
            joined.extend_from_slice(&buffered);
            joined.extend_from_slice(&self.read_ahead);
            joined.freeze()
        };
        (self.stream, read_ahead)
    }

    fn wrote<T>(&self, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        self.activity
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl AsyncRead for Resting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let n = self.read_ahead.len().min(buf.remaining());
            buf.put_slice(&self.read_ahead[..n]);
            self.read_ahead.advance(n);
            self.activity.read_waiting.store(false, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.activity
            .read_waiting
            .store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Resting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.wrote(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

pin_project_lite::pin_project! {
    /// A connection that fails with `TimedOut` when its first byte does not
    /// arrive in time. hyper's header deadline only starts once a request
    /// begins (and protocol sniffing has none), so without this a client
    /// that connects and sends nothing holds the connection forever.
    struct FirstByteDeadline<IO> {
        #[pin]
        io: IO,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<IO> FirstByteDeadline<IO> {
    fn new(io: IO, within: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<IO: AsyncRead> AsyncRead for FirstByteDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return polled;
        };
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => *this.deadline = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the header deadline",
                )));
            }
            _ => {}
        }
        polled
    }
}

impl<IO: AsyncWrite> AsyncWrite for FirstByteDeadline<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections until `cancel` fires, running `serve` for each on
/// its own task with a token that asks it to drain; then waits up to
/// `grace` for them.
async fn accept_until_cancelled<F, Fut>(
    listener: TcpListener,
    cancel: CancellationToken,
    grace: Duration,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connections = TaskTracker::new();
    let drain = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve(stream, peer, drain.clone()));
    }
    drop(listener);
    drain.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener answering every request with its method, path and body
    /// length; `/hold` waits for `release` before answering and `/early`
    /// answers without reading the body.
    async fn echo_server(
        header_read_timeout: Duration,
        (rest_after, max_lingering): (Duration, usize),
        release: Arc<tokio::sync::Notify>,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = tower::service_fn(move |request: Request<RequestBody>| {
            let release = release.clone();
            async move {
                let (parts, body) = request.into_parts();
                let path = parts.uri.path().to_string();
                if path == "/early" {
                    return Ok::<_, Infallible>(Response::new(super::super::full("early")));
                }
                let len = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().len())
                    .unwrap_or(0);
                if path == "/hold" {
                    release.notified().await;
                }
                Ok(Response::new(super::super::full(format!(
                    "{} {} {len}",
                    parts.method, path
                ))))
            }
        });
        let cancel = CancellationToken::new();
        let options = ServeOptions {
            header_read_timeout,
            rest_after,
            max_lingering,
            ..ServeOptions::plaintext(Duration::from_secs(5))
        };
        let task = tokio::spawn(serve(listener, service, cancel.clone(), options));
        (addr, cancel, task)
    }

    fn request(method: &str, path: &str, body: &str) -> String {
        format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Reads one response (content-length bodies only): status, body, and
    /// whether it announced `connection: close`. None at end of stream.
    async fn response(
        stream: &mut TcpStream,
        pending: &mut Vec<u8>,
    ) -> Option<(u16, String, bool)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if pending.len() >= end + 4 + length {
                    let status = head[9..12].parse().unwrap();
                    let body =
                        String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
                    pending.drain(..end + 4 + length);
                    return Some((status, body, head.contains("connection: close")));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .expect("a response within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            pending.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn a_keep_alive_connection_serves_requests_across_rests() {
        // Resting after every request; after 20 ms idle (the timer is armed
        // after each request and mostly outrun by the next one); and with
        // no slot to idle in, at once again.
        for rest in [
            (Duration::ZERO, 128),
            (Duration::from_millis(20), 128),
            (Duration::from_secs(60), 0),
        ] {
            serves_requests_across_rests(rest).await;
        }
    }

    async fn serves_requests_across_rests(rest: (Duration, usize)) {
        let (addr, cancel, task) = echo_server(Duration::from_secs(5), rest, Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut pending = Vec::new();
        for i in 0..50 {
            let body = "x".repeat(i * 37);
            stream
                .write_all(request("POST", &format!("/r{i}"), &body).as_bytes())
                .await
                .unwrap();
            let (status, answer, _) = response(&mut stream, &mut pending).await.unwrap();
            assert_eq!(
                (status, answer),
                (200, format!("POST /r{i} {}", body.len()))
            );
        }
        // Three requests in one write (pipelined), then one split inside
        // its head and one whose body comes after its head.
        let three = [
            request("GET", "/a", ""),
            request("POST", "/b", "hello"),
            request("GET", "/c", ""),
        ]
        .concat();
        stream.write_all(three.as_bytes()).await.unwrap();
        for expected in ["GET /a 0", "POST /b 5", "GET /c 0"] {
            let (status, answer, _) = response(&mut stream, &mut pending).await.unwrap();
            assert_eq!((status, answer.as_str()), (200, expected));
        }
        let split = request("POST", "/split", "0123456789");
        let (head, rest) = split.split_at(12);
        stream.write_all(head.as_bytes()).await.unwrap();
        tokio::task::yield_now().await;
        stream.write_all(rest.as_bytes()).await.unwrap();
        assert_eq!(
            response(&mut stream, &mut pending).await.unwrap().1,
            "POST /split 10"
        );
        let late = request("POST", "/late", "abcdef");
        let (head, body) = late.split_at(late.len() - 6);
        stream.write_all(head.as_bytes()).await.unwrap();
        tokio::task::yield_now().await;
        stream.write_all(body.as_bytes()).await.unwrap();
        assert_eq!(
            response(&mut stream, &mut pending).await.unwrap().1,
            "POST /late 6"
        );
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_unread_body_is_never_taken_for_the_next_request() {
        let (addr, cancel, task) = echo_server(
            Duration::from_secs(5),
            (Duration::ZERO, 128),
            Arc::default(),
        )
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut pending = Vec::new();
        // The body of /early arrives after its answer: hyper must drain it
        // or close, never parse it as a request.
        let early = "POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 80\r\n\r\n";
        stream.write_all(early.as_bytes()).await.unwrap();
        let (status, answer, _) = response(&mut stream, &mut pending).await.unwrap();
        assert_eq!((status, answer.as_str()), (200, "early"));
        let smuggled = request("GET", "/smuggled", "");
        let body = format!("{smuggled}{}", "y".repeat(80 - smuggled.len()));
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream
            .write_all(request("GET", "/next", "").as_bytes())
            .await;
        match response(&mut stream, &mut pending).await {
            None => {}
            Some((status, answer, _)) => {
                assert_eq!((status, answer.as_str()), (200, "GET /next 0"))
            }
        }
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_header_deadline() {
        // It rests after 50 ms, then waits out the deadline on the socket.
        let rest = (Duration::from_millis(50), 128);
        let (addr, cancel, task) =
            echo_server(Duration::from_millis(300), rest, Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut pending = Vec::new();
        stream
            .write_all(request("GET", "/", "").as_bytes())
            .await
            .unwrap();
        assert!(response(&mut stream, &mut pending).await.is_some());
        let started = tokio::time::Instant::now();
        assert!(
            response(&mut stream, &mut pending).await.is_none(),
            "closed while idle"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        // A connection that never sends is closed too.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(response(&mut silent, &mut Vec::new()).await.is_none());
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_drain_closes_resting_connections_and_finishes_busy_ones() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, cancel, task) = echo_server(
            Duration::from_secs(30),
            (Duration::ZERO, 128),
            release.clone(),
        )
        .await;
        let mut resting = TcpStream::connect(addr).await.unwrap();
        let mut resting_pending = Vec::new();
        resting
            .write_all(request("GET", "/", "").as_bytes())
            .await
            .unwrap();
        assert!(response(&mut resting, &mut resting_pending).await.is_some());
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(request("POST", "/hold", "abc").as_bytes())
            .await
            .unwrap();
        // The held request is in its handler once a probe on a third
        // connection is answered after it (requests are served in order of
        // arrival on one runtime, so poll until the handler waits).
        let waiting = async {
            loop {
                let mut probe = TcpStream::connect(addr).await.unwrap();
                probe
                    .write_all(request("GET", "/probe", "").as_bytes())
                    .await
                    .unwrap();
                assert!(response(&mut probe, &mut Vec::new()).await.is_some());
                if Arc::strong_count(&release) > 1 {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap();
        cancel.cancel();
        assert!(
            response(&mut resting, &mut resting_pending).await.is_none(),
            "a resting connection closes at once"
        );
        release.notify_one();
        let (status, answer, close) = response(&mut busy, &mut Vec::new()).await.unwrap();
        assert_eq!(
            (status, answer.as_str(), close),
            (200, "POST /hold 3", true)
        );
        task.await.unwrap();
    }
}
