//! Resting: a plaintext HTTP/1.1 connection whose requests are all
//! answered gives hyper's buffers back and waits for its next request on
//! the bare socket. A connection rests once it has idled for the rest
//! delay while holding one of a bounded number of lingering slots, or at
//! once when no slot is free, so that a client sending its next request
//! soon pays nothing for resting and idle connections cost little memory.
//! This module decides when; `socket` holds the connection while it rests.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Sleep;

use super::activity::Activity;

mod slots;
mod socket;

pub(super) use slots::Slots;
pub(super) use socket::{Resting, peek, readable};

use slots::Slot;

/// How a connection rests: what it is doing, how long it may idle with
/// its buffers, and the slots for doing so.
pub(super) struct Rest<'a> {
    /// What the connection is doing.
    pub(super) activity: &'a Activity,
    /// See `ServeOptions::rest_after`.
    pub(super) after: Duration,
    /// The listener's lingering slots.
    pub(super) lingering: &'a Slots,
}

/// One hyper connection's way to rest: the lingering slot it holds while
/// idle and the timer of its idle spell.
pub(super) struct Idling<'a> {
    rest: Rest<'a>,
    slot: Option<Slot<'a>>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The request count the timer was last armed at.
    armed_at: usize,
}

impl<'a> Idling<'a> {
    /// Not idle yet: no slot, no timer.
    pub(super) fn new(rest: Rest<'a>) -> Self {
        Self {
            rest,
            slot: None,
            timer: None,
            armed_at: 0,
        }
    }

    /// Wakes `waker` when the connection's last unit of work ends, which
    /// may happen on another task (a request body read to its end).
    pub(super) fn wake_on_idle(&self, waker: &Waker) {
        self.rest.activity.wake_on_idle(waker);
    }

    /// Ready once the connection may rest: idle and holding a slot for the
    /// rest delay since its last request, or idle with no slot free (or no
    /// delay). Pending while it is busy or `draining`, which gives up its
    /// slot.
    pub(super) fn poll_rest(&mut self, draining: bool, cx: &mut Context<'_>) -> Poll<()> {
        if draining || !self.rest.activity.idle() {
            // Busy again: the slot is for idle connections.
            self.slot = None;
            return Poll::Pending;
        }
        if self.slot.is_none() {
            let lingering: &'a Slots = self.rest.lingering;
            self.slot = lingering.take();
        }
        if self.rest.after.is_zero() || self.slot.is_none() {
            return Poll::Ready(());
        }
        // Idle since the last request finished: (re)arm the timer once per
        // request, rest when it fires.
        let calls = self.rest.activity.calls();
        let deadline = tokio::time::Instant::now() + self.rest.after;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if self.armed_at != calls {
            timer.as_mut().reset(deadline);
            self.armed_at = calls;
        }
        timer.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::http::serve::test_server::{echo_server, request, response};

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
}
