//! The [`Outbox`]: what other tasks hand to one connection for writing, bounded in bytes
//! (DESIGN §8). A slow subscriber loses messages beyond its budget; nobody else waits.
//!
//! It is deliberately small when idle (no allocation until something is queued) because
//! every connection has one.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

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
    packets: VecDeque<Bytes>,
    bytes: usize,
    close: Option<CloseReason>,
}

/// A connection's outbound queue and close signal.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
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
            notify: Notify::new(),
            limit,
        }
    }

    /// Queues an encoded packet, or drops it if that would exceed the byte budget.
    pub fn push(&self, packet: Bytes) -> Result<(), Dropped> {
        {
            let mut s = self.state.lock();
            if s.close.is_some() || s.bytes + packet.len() > self.limit {
                return Err(Dropped);
            }
            s.bytes += packet.len();
            s.packets.push_back(packet);
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Asks the connection to close; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        self.state.lock().close.get_or_insert(reason);
        self.notify.notify_one();
    }

    /// Waits until something is queued or a close was requested.
    pub async fn ready(&self) {
        loop {
            let notified = self.notify.notified();
            {
                let s = self.state.lock();
                if !s.packets.is_empty() || s.close.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Moves everything queued into `out` (oldest first) and returns a pending close.
    pub fn take(&self, out: &mut Vec<Bytes>) -> Option<CloseReason> {
        let mut s = self.state.lock();
        out.extend(s.packets.drain(..));
        s.bytes = 0;
        if s.packets.capacity() > 64 {
            // Give back what a burst grew; idle connections should stay small.
            s.packets = VecDeque::new();
        }
        s.close
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
