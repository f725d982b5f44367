//! In-process [`Bus`] for the embedded single node: every subscription is an unbounded
//! channel; publish walks the subscriptions and copies the (reference-counted) payload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use super::{is_valid_subject, subject_matches, Bus, BusError, BusMessage, Subscription};

struct Entry {
    id: u64,
    filter: String,
    tx: mpsc::UnboundedSender<BusMessage>,
}

#[derive(Default)]
struct Inner {
    subs: RwLock<Vec<Entry>>,
    next_id: AtomicU64,
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
        for e in self.inner.subs.read().iter() {
            if subject_matches(&e.filter, &subject) {
                // A closed receiver is being dropped; its guard removes it.
                let _ = e.tx.send(BusMessage {
                    subject: subject.clone(),
                    payload: payload.clone(),
                });
            }
        }
        Ok(())
    }

    async fn subscribe(&self, filter: String) -> Result<Subscription, BusError> {
        if !is_valid_subject(&filter, true) {
            return Err(BusError::InvalidSubject(filter));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.subs.write().push(Entry { id, filter, tx });
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

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn is_ready(&self) -> bool {
        true
    }
}
