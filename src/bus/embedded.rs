//! In-process [`Bus`] for the embedded single node: every subscription is an unbounded
//! channel; publish walks the subscriptions and copies the (reference-counted) payload,
//! to every plain subscription and to one member of each queue group, in turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use super::{
    is_valid_queue_group, is_valid_subject, subject_matches, Bus, BusError, BusMessage,
    Subscription,
};

struct Entry {
    id: u64,
    filter: String,
    /// The queue group, for a member of one.
    group: Option<String>,
    tx: mpsc::UnboundedSender<BusMessage>,
}

#[derive(Default)]
struct Inner {
    subs: RwLock<Vec<Entry>>,
    next_id: AtomicU64,
    /// Turns of the queue groups: which member a message goes to.
    turn: AtomicU64,
}

/// The in-process bus. Clones share one set of subscriptions.
#[derive(Clone, Default)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl EmbeddedBus {
    /// A bus with no subscriptions.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Removes the subscription when the stream is dropped.
struct Unsubscribe {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        self.inner.subs.write().retain(|e| e.id != self.id);
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        if !is_valid_subject(&subject, false) {
            return Err(BusError::InvalidSubject(subject));
        }
        let message = || BusMessage {
            subject: subject.clone(),
            payload: payload.clone(),
        };
        let subs = self.inner.subs.read();
        // The queue groups met so far, each with its matching members.
        let mut groups: Vec<(&str, Vec<&Entry>)> = Vec::new();
        for e in subs.iter() {
            if !subject_matches(&e.filter, &subject) {
                continue;
            }
            match &e.group {
                // A closed receiver is being dropped; its guard removes it.
                None => drop(e.tx.send(message())),
                Some(g) => match groups.iter_mut().find(|(name, _)| name == g) {
                    Some((_, members)) => members.push(e),
                    None => groups.push((g, vec![e])),
                },
            }
        }
        for (_, members) in groups {
            let turn = self.inner.turn.fetch_add(1, Ordering::Relaxed) as usize;
            // The member whose turn it is, or the next one still listening.
            (0..members.len())
                .map(|i| members[(turn + i) % members.len()])
                .find(|m| m.tx.send(message()).is_ok());
        }
        Ok(())
    }

    async fn subscribe(&self, filter: String) -> Result<Subscription, BusError> {
        self.join(filter, None)
    }

    async fn queue_subscribe_counted(
        &self,
        filter: String,
        group: String,
        _dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<Subscription, BusError> {
        if !is_valid_queue_group(&group) {
            return Err(BusError::InvalidSubject(group));
        }
        self.join(filter, Some(group))
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn is_ready(&self) -> bool {
        true
    }
}

impl EmbeddedBus {
    /// A subscription to `filter`, in `group` if there is one.
    fn join(&self, filter: String, group: Option<String>) -> Result<Subscription, BusError> {
        if !is_valid_subject(&filter, true) {
            return Err(BusError::InvalidSubject(filter));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.subs.write().push(Entry {
            id,
            filter,
            group,
            tx,
        });
        let guard = Unsubscribe {
            inner: self.inner.clone(),
            id,
        };
        // The stream owns the guard: dropping the stream unsubscribes.
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv().await.map(|m| (m, (rx, guard)))
        });
        Ok(Box::pin(stream))
    }
}
