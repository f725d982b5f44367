//! The [`Outbox`]: what other tasks hand to one connection for writing, bounded in bytes
//! (DESIGN §8). A slow subscriber loses messages beyond its budget; nobody else waits.
//!
//! It is deliberately small when idle (no allocation until something is queued) because
//! every connection has one.

use std::future::poll_fn;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use parking_lot::Mutex;

/// Why a connection is being closed by someone other than its own task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Another connection took over the client ID.
    Takeover,
    /// The API key was revoked.
    KeyRevoked,
    /// The node is shutting down.
    Draining,
}

impl CloseReason {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Takeover => "takeover",
            CloseReason::KeyRevoked => "key_revoked",
            CloseReason::Draining => "draining",
        }
    }
}

#[derive(Default)]
struct State {
    packets: Vec<Bytes>,
    bytes: usize,
    close: Option<CloseReason>,
    /// The connection has ended: nothing is queued any more.
    finished: bool,
}

/// A connection's outbound queue and close signal. Any task may push or close; one task,
/// the connection's, waits and takes.
pub struct Outbox {
    state: Mutex<State>,
    /// The connection task, when it waits. Registered before the queue is checked, so a
    /// push after the check always finds it.
    waker: AtomicWaker,
    limit: usize,
}

/// The message was dropped because the outbox is over its byte budget or closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped;

impl Outbox {
    /// An empty outbox that holds at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::default(),
            waker: AtomicWaker::new(),
            limit,
        }
    }

    /// Queues an encoded packet, or drops it if that would exceed the byte budget.
    pub fn push(&self, packet: Bytes) -> Result<(), Dropped> {
        let was_empty = {
            let mut s = self.state.lock();
            if s.close.is_some() || s.finished || s.bytes + packet.len() > self.limit {
                return Err(Dropped);
            }
            s.bytes += packet.len();
            s.packets.push(packet);
            s.packets.len() == 1
        };
        // Only the first packet of a batch needs to wake the connection: it takes
        // everything queued when it runs.
        if was_empty {
            self.waker.wake();
        }
        Ok(())
    }

    /// Asks the connection to close; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        self.state.lock().close.get_or_insert(reason);
        self.waker.wake();
    }

    /// Ready when something is queued or a close was requested; otherwise `cx` is woken
    /// when that happens. Only one task may wait on an outbox.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        let s = self.state.lock();
        if !s.packets.is_empty() || s.close.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until something is queued or a close was requested (see
    /// [`Outbox::poll_ready`]).
    pub async fn ready(&self) {
        poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Moves everything queued to the end of `out` (oldest first) and returns a pending
    /// close. When `out` is empty the two buffers trade places, so that a connection
    /// that keeps taking into the same emptied vector allocates nothing.
    pub fn take(&self, out: &mut Vec<Bytes>) -> Option<CloseReason> {
        let mut s = self.state.lock();
        if out.is_empty() {
            std::mem::swap(&mut s.packets, out);
            if s.packets.capacity() > 256 {
                // Give back what a burst grew.
                s.packets = Vec::new();
            }
        } else {
            out.append(&mut s.packets);
        }
        s.bytes = 0;
        s.close
    }

    /// Ends the outbox when its connection ends: later pushes are refused (and counted by
    /// whoever pushes), and what is still queued is moved to the end of `out`, so that the
    /// connection can count what it will never write.
    pub fn finish(&self, out: &mut Vec<Bytes>) {
        let mut s = self.state.lock();
        s.finished = true;
        out.append(&mut s.packets);
        s.packets = Vec::new();
        s.bytes = 0;
    }

    /// Frees the queue's buffer if nothing is queued: for a connection going idle.
    pub fn release_idle(&self) {
        let mut s = self.state.lock();
        if s.packets.is_empty() {
            s.packets = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_in_bytes_and_drains_in_order() {
        let o = Outbox::new(10);
        o.push(Bytes::from_static(b"12345")).unwrap();
        o.push(Bytes::from_static(b"678")).unwrap();
        assert_eq!(o.push(Bytes::from_static(b"abc")), Err(Dropped));
        o.ready().await;
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), None);
        assert_eq!(
            out,
            vec![Bytes::from_static(b"12345"), Bytes::from_static(b"678")]
        );
        // Draining frees the budget.
        o.push(Bytes::from_static(b"abcdefghij")).unwrap();
    }

    #[test]
    fn finish_hands_over_what_is_queued_and_refuses_more() {
        let o = Outbox::new(10);
        o.push(Bytes::from_static(b"12")).unwrap();
        let mut out = vec![Bytes::from_static(b"0")];
        o.finish(&mut out);
        assert_eq!(
            out,
            vec![Bytes::from_static(b"0"), Bytes::from_static(b"12")]
        );
        assert_eq!(o.push(Bytes::from_static(b"x")), Err(Dropped));
        o.take(&mut out);
        assert_eq!(out.len(), 2, "nothing queued after finish");
    }

    #[tokio::test]
    async fn close_wakes_and_first_reason_wins() {
        let o = std::sync::Arc::new(Outbox::new(10));
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.ready().await })
        };
        o.close(CloseReason::Takeover);
        o.close(CloseReason::Draining);
        waiter.await.unwrap();
        assert_eq!(o.take(&mut Vec::new()), Some(CloseReason::Takeover));
        assert_eq!(o.push(Bytes::from_static(b"x")), Err(Dropped));
    }
}
