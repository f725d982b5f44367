//! Admission: the two bounds a socket passes on its way in. Before its CONNECT is read it
//! holds one of `mqtt.max_pending_handshakes` [`PendingSlot`]s; once authenticated it holds
//! one of `mqtt.max_connections` connection permits instead. The two are counted apart, so
//! that sockets which never log in cannot hold the places of clients that do.
//!
//! When every pending slot is taken, a new socket takes the slot of the oldest waiting one,
//! which is closed: a login sends its CONNECT at once and is done waiting within a round
//! trip, while a silent or dribbling socket is the first to go. A socket whose CONNECT has
//! been read gives its slot back before its key is checked and can no longer be evicted.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// The bounds of one node's MQTT listener.
pub struct Admission {
    /// Established connections (`mqtt.max_connections`).
    connections: Arc<Semaphore>,
    max_connections: usize,
    pending: Arc<Pending>,
}

struct Pending {
    max: usize,
    /// Waiting sockets by age (the key grows with every admission).
    waiting: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
    gauge: Gauge,
}

/// A socket's place among the pending handshakes; given back when dropped.
pub struct PendingSlot {
    id: u64,
    evicted: CancellationToken,
    pending: Arc<Pending>,
}

impl Admission {
    /// Bounds of `max_connections` established connections and `max_pending` waiting
    /// handshakes, the latter reported in `gauge`.
    pub fn new(max_connections: usize, max_pending: usize, gauge: Gauge) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            pending: Arc::new(Pending {
                max: max_pending,
                waiting: Mutex::default(),
                gauge,
            }),
        }
    }

    /// A pending slot for a new socket, and whether an older socket was evicted for it.
    pub fn admit(&self) -> (PendingSlot, bool) {
        let evicted = CancellationToken::new();
        let mut guard = self.pending.waiting.lock();
        let (next, waiting) = &mut *guard;
        let mut full = false;
        if waiting.len() >= self.pending.max {
            if let Some((_, oldest)) = waiting.pop_first() {
                oldest.cancel();
                full = true;
            }
        }
        let id = *next;
        *next += 1;
        waiting.insert(id, evicted.clone());
        self.pending.gauge.set(waiting.len() as i64);
        drop(guard);
        let slot = PendingSlot {
            id,
            evicted,
            pending: self.pending.clone(),
        };
        (slot, full)
    }

    /// A permit for an authenticated connection, `None` when the node is full.
    pub fn connect(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Sockets waiting for their CONNECT now.
    pub fn pending(&self) -> usize {
        self.pending.waiting.lock().1.len()
    }

    /// Waits until every established connection has ended (for the drain).
    pub async fn all_closed(&self) {
        let _ = self
            .connections
            .acquire_many(self.max_connections as u32)
            .await;
    }
}

impl PendingSlot {
    /// Completes when a newer socket took this slot.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut guard = self.pending.waiting.lock();
        guard.1.remove(&self.id);
        self.pending.gauge.set(guard.1.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_table_evicts_the_oldest_waiting_socket() {
        let admission = Admission::new(10, 2, Gauge::default());
        let (a, full) = admission.admit();
        assert!(!full);
        let (b, _) = admission.admit();
        let (c, full) = admission.admit();
        assert!(full, "the third socket found the table full");
        // The oldest went, the others stay.
        a.evicted().await;
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(admission.pending(), 2);
        drop(a);
        assert_eq!(
            admission.pending(),
            2,
            "an evicted slot was already given back"
        );
        drop(b);
        assert_eq!(admission.pending(), 1);
        let (_d, full) = admission.admit();
        assert!(!full, "a slot given back makes room without evicting");
    }

    #[test]
    fn connections_are_counted_apart_from_handshakes() {
        let admission = Admission::new(1, 1, Gauge::default());
        let (_slot, _) = admission.admit();
        let permit = admission
            .connect()
            .expect("pending handshakes hold no permit");
        assert!(admission.connect().is_none(), "the node is full");
        drop(permit);
        assert!(admission.connect().is_some());
    }
}
