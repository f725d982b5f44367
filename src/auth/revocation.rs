//! [`Revocations`]: what a node remembers of recent key revocations, so that a revocation
//! that races a login is never lost (DESIGN §3).
//!
//! The race: a node starts reading a key from the store, the key is revoked (deleted from
//! the store, the `KeyRevoked` signal evicts it from every cache), and then the read
//! returns the record it fetched before the delete. Cached, that record would keep opening
//! connections for the cache's TTL; accepted, the connection would never be closed, since
//! the signal came and went before it registered.
//!
//! So every revocation leaves a tombstone numbered by a node-wide sequence, and every use
//! of a key record is checked against the tombstones by a [`Ticket`]: the sequence number
//! taken *before* the record was read (or, for a connection, before its login began). A
//! tombstone of that key ID newer than the ticket means the record may predate the
//! revocation, and it is not used:
//!
//! - a store read, as it returns and before it is cached;
//! - a cache hit, before it is accepted (the cache may have been filled by a read that
//!   passed the first check an instant before the tombstone arrived);
//! - a connection, as it registers (the revocation may have arrived between its login and
//!   its registration, when no registry entry could be closed).
//!
//! Tombstones are kept for `retention` (the key cache's TTL and a margin, so that every
//! cache entry a tombstone could concern expires first) and at most `capacity` of them. A
//! tombstone dropped early (over capacity) raises a floor instead: any ticket older than
//! the floor counts as possibly revoked, so forgetting costs store reads, never safety.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

/// A point in the revocation sequence of one node, taken before a key record is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What the revocations recorded since a [`Ticket`] say about one key ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Not revoked since the ticket was taken.
    Current,
    /// Revoked since the ticket was taken.
    Revoked,
    /// Unknown: a revocation since the ticket was taken has been forgotten (over capacity).
    /// The record must be read again.
    Forgotten,
}

/// Recent revocations of one node. See the module documentation.
pub struct Revocations {
    /// Revocations recorded so far; a [`Ticket`] is a value of it.
    seq: AtomicU64,
    state: Mutex<State>,
    retention: Duration,
    capacity: usize,
    /// Tombstones dropped before their retention ended.
    dropped: Counter,
}

#[derive(Default)]
struct State {
    /// Key ID → sequence number of its latest revocation.
    tombstones: HashMap<String, u64>,
    /// Every tombstone in the order it was recorded, with when, for expiry.
    order: VecDeque<(Instant, u64, String)>,
    /// Tickets below this are [`Standing::Forgotten`].
    floor: u64,
}

impl Revocations {
    /// Remembers revocations for `retention`, at most `capacity` at a time (at least one);
    /// `dropped` counts the ones forgotten early.
    pub fn new(retention: Duration, capacity: usize, dropped: Counter) -> Self {
        Self {
            seq: AtomicU64::new(0),
            state: Mutex::default(),
            retention,
            capacity: capacity.max(1),
            dropped,
        }
    }

    /// The ticket to take before reading a key record (or before a login begins).
    pub fn ticket(&self) -> Ticket {
        Ticket(self.seq.load(Ordering::SeqCst))
    }

    /// Records that `key_id` was revoked now.
    pub fn record(&self, key_id: &str) {
        self.record_at(key_id, Instant::now());
    }

    fn record_at(&self, key_id: &str, now: Instant) {
        let mut state = self.state.lock();
        self.expire(&mut state, now);
        // Numbered under the lock, so that `order` is sorted by number.
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        state.tombstones.insert(key_id.to_owned(), n);
        state.order.push_back((now, n, key_id.to_owned()));
        while state.order.len() > self.capacity {
            Self::forget_oldest(&mut state);
            self.dropped.inc();
        }
    }

    /// What the revocations since `ticket` say about `key_id`.
    pub fn standing(&self, key_id: &str, ticket: Ticket) -> Standing {
        // The usual case: nothing at all was revoked since the ticket, no lock taken.
        if ticket.0 >= self.seq.load(Ordering::SeqCst) {
            return Standing::Current;
        }
        let state = self.state.lock();
        if state.tombstones.get(key_id).is_some_and(|&n| n > ticket.0) {
            Standing::Revoked
        } else if ticket.0 < state.floor {
            Standing::Forgotten
        } else {
            Standing::Current
        }
    }

    /// Drops the tombstones older than the retention.
    fn expire(&self, state: &mut State, now: Instant) {
        while state
            .order
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= self.retention)
        {
            Self::forget_oldest(state);
        }
    }

    /// Drops the oldest tombstone; tickets taken before it become `Forgotten`. (For an
    /// expired tombstone that concerns no live cache entry: the entries read before it
    /// have expired.)
    fn forget_oldest(state: &mut State) {
        let Some((_, n, key_id)) = state.order.pop_front() else {
            return;
        };
        if state.tombstones.get(&key_id) == Some(&n) {
            state.tombstones.remove(&key_id);
        }
        state.floor = state.floor.max(n);
    }

    /// Tombstones held now.
    pub fn len(&self) -> usize {
        self.state.lock().order.len()
    }

    /// Whether no tombstone is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocations(capacity: usize) -> Revocations {
        Revocations::new(Duration::from_secs(60), capacity, Counter::default())
    }

    #[test]
    fn a_read_that_began_before_a_revocation_is_revoked_and_a_later_one_is_current() {
        let r = revocations(10);
        let before = r.ticket();
        assert_eq!(r.standing("KEY", before), Standing::Current);
        r.record("KEY");
        assert_eq!(r.standing("KEY", before), Standing::Revoked);
        assert_eq!(r.standing("OTHER", before), Standing::Current);
        let after = r.ticket();
        assert_eq!(r.standing("KEY", after), Standing::Current);
        // Revoked again later: the earlier ticket stays revoked, the later one too now.
        r.record("KEY");
        assert_eq!(r.standing("KEY", before), Standing::Revoked);
        assert_eq!(r.standing("KEY", after), Standing::Revoked);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn over_capacity_the_oldest_is_forgotten_and_older_tickets_must_read_again() {
        let dropped = Counter::default();
        let r = Revocations::new(Duration::from_secs(60), 2, dropped.clone());
        let first = r.ticket();
        r.record("A");
        let second = r.ticket();
        r.record("B");
        r.record("C");
        assert_eq!(dropped.get(), 1);
        assert_eq!(r.len(), 2);
        // A's tombstone is gone: a ticket from before it cannot know whether A was revoked.
        assert_eq!(r.standing("A", first), Standing::Forgotten);
        assert_eq!(r.standing("UNRELATED", first), Standing::Forgotten);
        // Later tickets are unaffected, and remembered tombstones still answer.
        assert_eq!(r.standing("A", second), Standing::Current);
        assert_eq!(r.standing("B", second), Standing::Revoked);
        assert_eq!(r.standing("C", first), Standing::Revoked);
    }

    #[test]
    fn tombstones_expire_after_the_retention_and_raise_the_floor() {
        let r = revocations(10);
        let t0 = Instant::now();
        let before = r.ticket();
        r.record_at("A", t0);
        let between = r.ticket();
        r.record_at("B", t0 + Duration::from_secs(30));
        // A minute after A: A expires when the next revocation is recorded.
        r.record_at("C", t0 + Duration::from_secs(60));
        assert_eq!(r.len(), 2);
        assert_eq!(r.standing("A", before), Standing::Forgotten);
        assert_eq!(r.standing("A", between), Standing::Current);
        assert_eq!(r.standing("B", between), Standing::Revoked);
    }

    #[test]
    fn a_tombstone_replaced_by_a_newer_one_is_not_removed_by_the_older_ones_expiry() {
        let r = revocations(10);
        let t0 = Instant::now();
        r.record_at("A", t0);
        let between = r.ticket();
        r.record_at("A", t0 + Duration::from_secs(30));
        r.record_at("B", t0 + Duration::from_secs(61));
        assert_eq!(r.standing("A", between), Standing::Revoked);
    }
}
