//! [`MemorySessions`]: persistent sessions in the memory of one embedded node. They
//! survive their connections (and takeovers), not the process.
//!
//! Each session captures its application's traffic from the bus into a queue of its own,
//! bounded by `sessions.max_pending_messages` and `sessions.max_pending_bytes` (the oldest
//! go first, counted as overflow); a message leaves the queue when acknowledged. An
//! attachment hands out the queue from its oldest message, so what an earlier connection
//! had in flight comes again first, marked redelivered. Shared subscriptions of
//! persistent sessions have queues of their own, handed out to many members at once
//! ([`shares`]).

mod shares;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::{
    Opened, SavedFilter, SessionConsumer, SessionError, SessionKey, SessionRecord, SessionStore,
    SessionsConfig, Stored, TenantUsage,
};
use crate::bus::{Bus, BusMessage, Subscription};
use crate::topic::ShareKey;

/// Persistent sessions in memory (see the module docs).
pub struct MemorySessions {
    inner: Arc<Inner>,
    shares: shares::Shares,
}

struct Inner {
    bus: Arc<dyn Bus>,
    limits: Limits,
    sessions: Mutex<HashMap<SessionKey, Arc<Session>>>,
    expired: Mutex<Counter>,
}

#[derive(Clone, Copy)]
struct Limits {
    expiry: Duration,
    max_messages: u64,
    max_bytes: u64,
    max_sessions_per_tenant: u64,
}

struct Session {
    state: Mutex<State>,
    /// Wakes the attached consumer when a message arrives or it is detached.
    arrived: Notify,
    /// The task that captures the application's traffic.
    capture: Mutex<Option<AbortHandle>>,
}

#[derive(Default)]
struct State {
    record: SessionRecord,
    queue: Queue,
    /// The first sequence the current attachment has not handed out yet.
    cursor: u64,
    /// Number of the current attachment; 0 while detached.
    attached: u64,
    attachments: u64,
}

/// The unacknowledged messages of a session or a share, oldest first, within
/// `sessions.max_pending_messages` and `sessions.max_pending_bytes`.
#[derive(Default)]
struct Queue {
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
    /// Messages dropped for the bounds and not reported yet.
    overflowed: u64,
}

struct Entry {
    seq: u64,
    subject: String,
    payload: Bytes,
    /// Whether it was handed out before (it goes out again as a redelivery).
    handed_out: bool,
    /// The member of a share holding it now (0: none; a session's own queue: always 0).
    holder: u64,
}

impl Queue {
    /// Appends `msg`, dropping the oldest past `limits`.
    fn push(&mut self, msg: BusMessage, limits: &Limits) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += msg.payload.len() as u64;
        self.entries.push_back(Entry {
            seq,
            subject: msg.subject,
            payload: msg.payload,
            handed_out: false,
            holder: 0,
        });
        while self.entries.len() as u64 > limits.max_messages || self.bytes > limits.max_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.payload.len() as u64;
            self.overflowed += 1;
        }
    }

    /// Forgets message `seq`, if it is still held.
    fn ack(&mut self, seq: u64) {
        if let Ok(at) = self.entries.binary_search_by_key(&seq, |e| e.seq) {
            if let Some(e) = self.entries.remove(at) {
                self.bytes -= e.payload.len() as u64;
            }
        }
    }

    /// Hands out `entry` (marking it handed out) as a stored message.
    fn hand_out(entry: &mut Entry) -> Stored {
        let stored = Stored {
            seq: entry.seq,
            subject: entry.subject.clone(),
            payload: entry.payload.clone(),
            redelivered: entry.handed_out,
        };
        entry.handed_out = true;
        stored
    }
}

/// What a capture task appends its application's traffic to: a session or a share.
trait Captures: Send + Sync + 'static {
    /// Appends `msg` within `limits` and wakes whoever waits for it.
    fn captured(&self, msg: BusMessage, limits: &Limits);
}

impl MemorySessions {
    /// Sessions capturing traffic from `bus`, bounded and expiring as `config` says.
    pub fn new(bus: Arc<dyn Bus>, config: &SessionsConfig) -> Self {
        let limits = Limits {
            expiry: config.expiry,
            max_messages: config.max_pending_messages,
            max_bytes: config.max_pending_bytes,
            max_sessions_per_tenant: config.max_sessions_per_tenant,
        };
        Self {
            shares: shares::Shares::new(bus.clone(), limits),
            inner: Arc::new(Inner {
                bus,
                limits,
                sessions: Mutex::default(),
                expired: Mutex::new(Counter::default()),
            }),
        }
    }

    /// How many sessions are held.
    pub fn len(&self) -> usize {
        self.inner.sessions.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn create(&self, key: &SessionKey) -> Result<Arc<Session>, SessionError> {
        let sub = self
            .inner
            .bus
            .subscribe(key.app.traffic_subject_filter())
            .await
            .map_err(|e| SessionError::Unavailable(e.to_string()))?;
        let session = Arc::new(Session {
            state: Mutex::new(State {
                record: SessionRecord {
                    client_id: key.client_id.clone(),
                    ..SessionRecord::default()
                },
                ..State::default()
            }),
            arrived: Notify::new(),
            capture: Mutex::new(None),
        });
        let task = tokio::spawn(capture(sub, Arc::downgrade(&session), self.inner.limits));
        *session.capture.lock() = Some(task.abort_handle());
        Ok(session)
    }
}

impl Session {
    fn stop(&self) {
        if let Some(task) = self.capture.lock().take() {
            task.abort();
        }
        self.arrived.notify_waiters();
    }
}

impl Captures for Session {
    fn captured(&self, msg: BusMessage, limits: &Limits) {
        self.state.lock().queue.push(msg, limits);
        self.arrived.notify_waiters();
    }
}

/// Appends every message of `sub` to `target` (until it is gone), dropping the oldest past
/// the bounds.
async fn capture<T: Captures>(mut sub: Subscription, target: Weak<T>, limits: Limits) {
    while let Some(msg) = sub.next().await {
        let Some(target) = target.upgrade() else {
            return;
        };
        target.captured(msg, &limits);
    }
}

impl MemorySessions {
    /// Sessions and shares `tenant` keeps, for `sessions.max_sessions_per_tenant`.
    fn kept_of(&self, tenant: &crate::topic::Id) -> u64 {
        let sessions = (self.inner.sessions.lock().keys())
            .filter(|k| &k.app.tenant == tenant)
            .count() as u64;
        sessions + self.shares.count_of(tenant)
    }
}

#[async_trait]
impl SessionStore for MemorySessions {
    async fn open(&self, key: &SessionKey) -> Result<Opened, SessionError> {
        let found = self.inner.sessions.lock().get(key).cloned();
        let (session, present) = match found {
            Some(s) => (s, true),
            None => {
                if self.kept_of(&key.app.tenant) >= self.inner.limits.max_sessions_per_tenant {
                    return Err(SessionError::Full);
                }
                let s = self.create(key).await?;
                let mut sessions = self.inner.sessions.lock();
                // Two CONNECTs of one client ID raced: the first one in wins.
                match sessions.get(key) {
                    Some(other) => {
                        s.stop();
                        (other.clone(), true)
                    }
                    None => {
                        sessions.insert(key.clone(), s.clone());
                        (s, false)
                    }
                }
            }
        };
        let (number, filters, pending) = {
            let mut s = session.state.lock();
            s.attachments += 1;
            s.attached = s.attachments;
            // Hand out everything unacknowledged again, oldest first.
            s.cursor = s.queue.entries.front().map_or(s.queue.next_seq, |e| e.seq);
            (
                s.attached,
                s.record.filters.clone(),
                s.queue.entries.len() as u64,
            )
        };
        // A consumer of an earlier attachment sees that it is no longer attached.
        session.arrived.notify_waiters();
        Ok(Opened {
            present,
            filters,
            pending,
            consumer: Box::new(MemoryConsumer {
                session,
                number,
                key: key.clone(),
                store: Arc::downgrade(&self.inner),
            }),
        })
    }

    async fn discard(&self, key: &SessionKey) -> Result<bool, SessionError> {
        let removed = self.inner.sessions.lock().remove(key);
        if let Some(s) = &removed {
            s.stop();
        }
        Ok(removed.is_some())
    }

    async fn join_share(&self, share: &ShareKey) -> Result<Box<dyn SessionConsumer>, SessionError> {
        // A new share counts against the tenant's sessions.max_sessions_per_tenant.
        if !self.shares.exists(share)
            && self.kept_of(&share.app.tenant) >= self.inner.limits.max_sessions_per_tenant
        {
            return Err(SessionError::Full);
        }
        self.shares.join(share).await
    }

    /// Counts in `counter` every session discarded for its expiry.
    fn count_expiries_in(&self, counter: Counter) {
        *self.inner.expired.lock() = counter;
    }

    async fn usage(&self) -> Result<Vec<TenantUsage>, SessionError> {
        let mut usage = Usage::default();
        // The map's lock is not held while a session's is taken.
        let sessions: Vec<(crate::topic::Id, Arc<Session>)> = (self.inner.sessions.lock().iter())
            .map(|(key, session)| (key.app.tenant.clone(), session.clone()))
            .collect();
        for (tenant, session) in sessions {
            usage.add(&tenant, &session.state.lock().queue);
        }
        self.shares.add_usage(&mut usage);
        Ok(usage.into_vec())
    }
}

/// [`TenantUsage`] summed over queues.
#[derive(Default)]
struct Usage(HashMap<crate::topic::Id, TenantUsage>);

impl Usage {
    fn add(&mut self, tenant: &crate::topic::Id, queue: &Queue) {
        let entry = self.0.entry(tenant.clone()).or_insert_with(|| TenantUsage {
            tenant: tenant.clone(),
            sessions: 0,
            messages: 0,
            bytes: 0,
        });
        entry.sessions += 1;
        entry.messages += queue.entries.len() as u64;
        entry.bytes += queue.bytes;
    }

    fn into_vec(self) -> Vec<TenantUsage> {
        self.0.into_values().collect()
    }
}

/// One connection's attachment to a session in memory.
struct MemoryConsumer {
    session: Arc<Session>,
    /// Its attachment number: another one means it was taken over.
    number: u64,
    key: SessionKey,
    store: Weak<Inner>,
}

impl MemoryConsumer {
    fn taken_over(&self, s: &State) -> bool {
        s.attached != self.number
    }
}

#[async_trait]
impl SessionConsumer for MemoryConsumer {
    async fn next(&mut self) -> Result<Stored, SessionError> {
        loop {
            let arrived = self.session.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            // Asked before the state is locked: the expiry locks the map, then the state.
            let held = self.is_held();
            {
                let mut s = self.session.state.lock();
                if self.taken_over(&s) {
                    return Err(SessionError::TakenOver);
                }
                let cursor = s.cursor;
                // The queue is in sequence order: find the first entry not handed out.
                let at = s.queue.entries.partition_point(|e| e.seq < cursor);
                if let Some(e) = s.queue.entries.get_mut(at) {
                    let stored = Queue::hand_out(e);
                    s.cursor = stored.seq + 1;
                    return Ok(stored);
                }
                if !held {
                    return Err(SessionError::Unavailable(
                        "the session was discarded".into(),
                    ));
                }
            }
            arrived.await;
        }
    }

    async fn ack(&mut self, seq: u64) -> Result<(), SessionError> {
        self.session.state.lock().queue.ack(seq);
        Ok(())
    }

    async fn save(&mut self, filters: &[SavedFilter]) -> Result<(), SessionError> {
        let mut s = self.session.state.lock();
        if self.taken_over(&s) {
            return Err(SessionError::TakenOver);
        }
        s.record.filters = filters.to_vec();
        Ok(())
    }

    async fn refresh(&mut self) -> Result<(), SessionError> {
        Ok(())
    }

    fn take_overflow(&mut self) -> u64 {
        std::mem::take(&mut self.session.state.lock().queue.overflowed)
    }

    async fn detach(self: Box<Self>) {
        {
            let mut s = self.session.state.lock();
            if self.taken_over(&s) {
                return;
            }
            s.attached = 0;
        }
        let Some(store) = self.store.upgrade() else {
            return;
        };
        let expiry = store.limits.expiry;
        let (store, session, key, number) =
            (Arc::downgrade(&store), self.session, self.key, self.number);
        // Expires the session unless a connection attached to it meanwhile.
        tokio::spawn(async move {
            tokio::time::sleep(expiry).await;
            let Some(store) = store.upgrade() else {
                return;
            };
            let mut sessions = store.sessions.lock();
            let idle = session.state.lock().attachments == number;
            let same = sessions.get(&key).is_some_and(|s| Arc::ptr_eq(s, &session));
            if idle && same {
                sessions.remove(&key);
                session.stop();
                store.expired.lock().inc();
            }
        });
    }
}

impl MemoryConsumer {
    /// Whether the store still holds this consumer's session.
    fn is_held(&self) -> bool {
        self.store.upgrade().is_some_and(|store| {
            store
                .sessions
                .lock()
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.session))
        })
    }
}
