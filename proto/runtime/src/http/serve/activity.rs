//! What one connection is doing, as far as putting it to rest goes: the
//! work open on it (handlers, request bodies, responses being written) and
//! what its current hyper connection last saw on the socket. Counted by
//! `tracked`, `request_body` and the resting socket; read by `rest`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Waker;

use futures_util::task::AtomicWaker;

/// See the module docs.
#[derive(Default)]
pub(super) struct Activity {
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
    /// Whether the current hyper connection has served a request, has no
    /// work open, is waiting for the client's next bytes with everything
    /// written, and left no request body unread.
    pub(super) fn idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
            && self.calls.load(Ordering::Relaxed) > 0
            && self.read_waiting.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
            && !self.unread_body.load(Ordering::Relaxed)
    }

    /// Opens one unit of work, done when the returned `Busy` drops.
    pub(super) fn enter(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// The current hyper connection took a request.
    pub(super) fn called(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests the current hyper connection has taken.
    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// A new hyper connection starts on the socket: nothing served, read
    /// or written yet.
    pub(super) fn spell_started(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.read_waiting.store(false, Ordering::Relaxed);
        self.write_blocked.store(false, Ordering::Relaxed);
        self.unread_body.store(false, Ordering::Relaxed);
    }

    /// Whether hyper's last read found the socket empty.
    pub(super) fn set_read_waiting(&self, waiting: bool) {
        self.read_waiting.store(waiting, Ordering::Relaxed);
    }

    /// Whether hyper's last write or flush could not finish.
    pub(super) fn set_write_blocked(&self, blocked: bool) {
        self.write_blocked.store(blocked, Ordering::Relaxed);
    }

    /// Wakes `waker` when the last unit of work ends.
    pub(super) fn wake_on_idle(&self, waker: &Waker) {
        self.waker.register(waker);
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
