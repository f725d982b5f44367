//! [`Counted`]: a NATS subscription that loses messages where it can count them.
//!
//! async-nats hands each subscription's messages over a bounded channel and, when the
//! channel is full, drops the message and reports `Event::SlowConsumer(sid)` through its
//! own event queue, which is bounded too (128 events) and silently loses reports when a
//! burst of drops outruns it: counts taken from those events are only a lower bound (in
//! `tests/overload.rs`'s flood, counting those events alone found 53k of 191k drops).
//!
//! So every poll first moves whatever the client has buffered for the subscription into a
//! queue of its own (without tokio's cooperative budget, which would stop after a few
//! messages), and it is this queue, bounded at `nats.subscription_capacity`, that drops the
//! newest message when its reader falls behind: each such drop is counted at once for the
//! subscription's owner. The client's channel stays nearly empty as long as the reader
//! runs at all; only a reader that is not polled for as long as a whole buffer takes to
//! arrive lets async-nats drop (and those drops are counted from its events, best effort).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use async_nats::{Message, Subscriber};
use futures::{Stream, StreamExt};

use super::Owner;
use crate::bus::BusMessage;

/// At most this many messages are taken from the client per poll, so that one poll's work
/// stays bounded while the client keeps filling the channel.
const DRAIN_BATCH: usize = 4096;

/// An emptied queue that grew past this many slots gives its memory back.
const SHRINK_ABOVE: usize = 4096;

/// A NATS subscription with a bounded queue of its own, whose drops are counted for its
/// owner (see the module docs). Dropping it unsubscribes.
pub(super) struct Counted {
    subscriber: Subscriber,
    queue: VecDeque<Message>,
    capacity: usize,
    owner: Owner,
    /// The client ended the subscription: what is queued is the rest.
    ended: bool,
}

impl Counted {
    /// Reads `subscriber` through a queue of `capacity` messages (at least one), counting
    /// its drops for `owner`.
    pub(super) fn new(subscriber: Subscriber, capacity: usize, owner: Owner) -> Self {
        Self {
            subscriber,
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            owner,
            ended: false,
        }
    }

    /// Moves what the client has buffered into the queue, dropping (and counting) what
    /// does not fit. Registers `cx` with the client when its channel is empty.
    fn drain(&mut self, cx: &mut Context<'_>) {
        if self.ended {
            return;
        }
        let Self {
            subscriber,
            queue,
            capacity,
            ended,
            ..
        } = self;
        let mut lost = 0u64;
        let take = std::future::poll_fn(|cx| {
            for _ in 0..DRAIN_BATCH {
                match subscriber.poll_next_unpin(cx) {
                    Poll::Ready(Some(m)) if queue.len() < *capacity => queue.push_back(m),
                    Poll::Ready(Some(_)) => lost += 1,
                    Poll::Ready(None) => {
                        *ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            Poll::Ready(())
        });
        // Always ready: the closure never returns Pending.
        let _ = pin!(tokio::task::coop::unconstrained(take)).poll(cx);
        if lost > 0 {
            self.owner.lost(lost);
        }
    }
}

impl Stream for Counted {
    type Item = BusMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BusMessage>> {
        // One unit of tokio's budget per message handed out: a reader that always finds
        // something queued still yields to the runtime now and then (and then drains
        // again when it comes back).
        let restore = ready!(tokio::task::coop::poll_proceed(cx));
        let this = &mut *self;
        this.drain(cx);
        match this.queue.pop_front() {
            Some(m) => {
                restore.made_progress();
                if this.queue.is_empty() && this.queue.capacity() > SHRINK_ABOVE {
                    this.queue = VecDeque::new();
                }
                Poll::Ready(Some(BusMessage {
                    subject: m.subject.into_string(),
                    payload: m.payload,
                }))
            }
            None if this.ended => Poll::Ready(None),
            // `drain` found the client's channel empty and registered `cx` with it.
            None => Poll::Pending,
        }
    }
}

/// The subscription ID async-nats gave `subscriber` (the one its `SlowConsumer` events
/// name), read from its `Debug` output: async-nats 0.51 has no accessor for it.
pub(super) fn sid_of(subscriber: &Subscriber) -> Option<u64> {
    let debug = format!("{subscriber:?}");
    let rest = debug.strip_prefix("Subscriber { sid: ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client takes subscriptions before it has a server (it sends them once
    /// connected), so the IDs can be read without one.
    #[tokio::test]
    async fn subscription_ids_are_read() {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        let a = client.subscribe("a.>").await.unwrap();
        let b = client.subscribe("b.>").await.unwrap();
        let (sa, sb) = (sid_of(&a).unwrap(), sid_of(&b).unwrap());
        assert_ne!(sa, sb);
        assert_eq!(sb, sa + 1);
    }
}
