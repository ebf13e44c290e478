//! The bare-socket side of resting: the socket under a hyper HTTP/1.1
//! connection (with the bytes a previous one read ahead), and the waits for
//! a client's next bytes that hold nothing but the socket.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::http::serve::activity::Activity;

/// Waits, holding nothing but the socket, until the client sends bytes,
/// and peeks at them (up to `head.len()`, none consumed). None when the
/// client closes, the deadline passes or the listener drains first.
pub(in crate::http::serve) async fn peek(
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
/// `peek` (no system call), for connections whose protocol is known; a
/// spurious wake-up only starts a hyper connection early.
pub(in crate::http::serve) async fn readable(
    stream: &TcpStream,
    within: Duration,
    drain: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = drain.cancelled() => false,
        ready = tokio::time::timeout(within, stream.readable()) => matches!(ready, Ok(Ok(()))),
    }
}

/// The socket under a hyper HTTP/1.1 connection: first the bytes a previous
/// hyper connection read ahead, then the socket; reports to `Activity`
/// whether hyper's reads find nothing and whether its writes got through.
pub(in crate::http::serve) struct Resting {
    read_ahead: Bytes,
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Resting {
    /// Starts a hyper connection's spell: nothing served, read or written yet.
    pub(in crate::http::serve) fn new(
        read_ahead: Bytes,
        stream: TcpStream,
        activity: Arc<Activity>,
    ) -> Self {
        activity.spell_started();
        Self {
            read_ahead,
            stream,
            activity,
        }
    }

    /// The socket, and every byte read from it that no request consumed:
    /// hyper's unparsed `buffered` followed by what it never took from here.
    pub(in crate::http::serve) fn into_parts(self, buffered: Bytes) -> (TcpStream, Bytes) {
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
        self.activity.set_write_blocked(polled.is_pending());
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
            self.activity.set_read_waiting(false);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.activity.set_read_waiting(polled.is_pending());
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
