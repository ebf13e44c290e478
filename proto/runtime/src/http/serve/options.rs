//! How a listener treats its connections: the options a process sets, and
//! the hyper builders made from them once per listener.

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_rustls::TlsAcceptor;

use super::rest::Slots;

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

/// What every connection of one listener is served with.
pub(super) struct Settings {
    /// HTTP/1.1 or h2, whichever the connection speaks.
    pub(super) auto: auto::Builder<TokioExecutor>,
    /// HTTP/1.1 only, for plaintext connections known not to be h2.
    pub(super) http1: http1::Builder,
    /// See `ServeOptions::header_read_timeout`.
    pub(super) header_read_timeout: Duration,
    /// See `ServeOptions::body_timeout`.
    pub(super) body_timeout: Duration,
    /// See `ServeOptions::rest_after`.
    pub(super) rest_after: Duration,
    /// The slots of idle connections keeping their buffers.
    pub(super) lingering: Slots,
}

impl Settings {
    /// HTTP/1.1 with a header deadline, a head size limit and keep-alive,
    /// h2 with a stream cap and a header list limit.
    pub(super) fn new(options: &ServeOptions) -> Self {
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
