//! Shares of the embedded store (issue 14): a shared subscription's messages held in
//! memory for its members with persistent sessions. Each share captures its application's
//! traffic into one bounded queue while it exists; each message is handed to one member
//! at a time, and goes back to the others when that member detaches without
//! acknowledging it. A share without members expires after `sessions.expiry`.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::{capture, Captures, Limits, Queue, Usage};
use crate::bus::{Bus, BusMessage};
use crate::sessions::{SavedFilter, SessionConsumer, SessionError, Stored};
use crate::topic::ShareKey;

/// Every share of the embedded store.
pub(super) struct Shares {
    bus: Arc<dyn Bus>,
    limits: Limits,
    shares: Arc<Mutex<HashMap<ShareKey, Arc<Share>>>>,
}

struct Share {
    state: Mutex<State>,
    /// Wakes the members when a message arrives or goes back to them.
    arrived: Notify,
    capture: Mutex<Option<AbortHandle>>,
}

#[derive(Default)]
struct State {
    queue: Queue,
    /// Members attached now.
    members: u64,
    /// Members ever attached: a number for each, and a generation for the expiry.
    joined: u64,
}

impl Shares {
    pub(super) fn new(bus: Arc<dyn Bus>, limits: Limits) -> Self {
        Self {
            bus,
            limits,
            shares: Arc::default(),
        }
    }

    /// Whether the share of `key` exists.
    pub(super) fn exists(&self, key: &ShareKey) -> bool {
        self.shares.lock().contains_key(key)
    }

    /// How many shares `tenant` keeps.
    pub(super) fn count_of(&self, tenant: &crate::topic::Id) -> u64 {
        (self.shares.lock().keys())
            .filter(|k| &k.app.tenant == tenant)
            .count() as u64
    }

    /// Adds what every share holds to `usage`.
    pub(super) fn add_usage(&self, usage: &mut Usage) {
        // The map's lock is not held while a share's is taken.
        let shares: Vec<(crate::topic::Id, Arc<Share>)> = (self.shares.lock().iter())
            .map(|(key, share)| (key.app.tenant.clone(), share.clone()))
            .collect();
        for (tenant, share) in shares {
            usage.add(&tenant, &share.state.lock().queue);
        }
    }

    /// Attaches a member to the share of `key`, made (capturing from now on) if needed.
    pub(super) async fn join(
        &self,
        key: &ShareKey,
    ) -> Result<Box<dyn SessionConsumer>, SessionError> {
        let found = self.shares.lock().get(key).cloned();
        let share = match found {
            Some(share) => share,
            None => {
                let sub = self
                    .bus
                    .subscribe(key.app.traffic_subject_filter())
                    .await
                    .map_err(|e| SessionError::Unavailable(e.to_string()))?;
                let made = Arc::new(Share {
                    state: Mutex::default(),
                    arrived: Notify::new(),
                    capture: Mutex::new(None),
                });
                let mut shares = self.shares.lock();
                match shares.get(key) {
                    // Two members joined at once: the first one in made it.
                    Some(other) => other.clone(),
                    None => {
                        let task = tokio::spawn(capture(sub, Arc::downgrade(&made), self.limits));
                        *made.capture.lock() = Some(task.abort_handle());
                        shares.insert(key.clone(), made.clone());
                        made
                    }
                }
            }
        };
        let member = {
            let mut s = share.state.lock();
            s.members += 1;
            s.joined += 1;
            s.joined
        };
        Ok(Box::new(Member {
            share,
            member,
            key: key.clone(),
            shares: Arc::downgrade(&self.shares),
            limits: self.limits,
        }))
    }
}

impl Share {
    fn stop(&self) {
        if let Some(task) = self.capture.lock().take() {
            task.abort();
        }
    }
}

impl Captures for Share {
    fn captured(&self, msg: BusMessage, limits: &Limits) {
        self.state.lock().queue.push(msg, limits);
        // One message, one member: whichever wakes first takes it.
        self.arrived.notify_one();
    }
}

/// One member's attachment to a share.
struct Member {
    share: Arc<Share>,
    /// Its number among the share's members (never 0).
    member: u64,
    key: ShareKey,
    shares: Weak<Mutex<HashMap<ShareKey, Arc<Share>>>>,
    limits: Limits,
}

#[async_trait]
impl SessionConsumer for Member {
    async fn next(&mut self) -> Result<Stored, SessionError> {
        loop {
            let arrived = self.share.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut s = self.share.state.lock();
                // Held messages are few (each member's window) and at the front.
                if let Some(e) = s.queue.entries.iter_mut().find(|e| e.holder == 0) {
                    e.holder = self.member;
                    return Ok(Queue::hand_out(e));
                }
            }
            arrived.await;
        }
    }

    async fn ack(&mut self, seq: u64) -> Result<(), SessionError> {
        self.share.state.lock().queue.ack(seq);
        Ok(())
    }

    async fn save(&mut self, _filters: &[SavedFilter]) -> Result<(), SessionError> {
        Ok(())
    }

    async fn refresh(&mut self) -> Result<(), SessionError> {
        Ok(())
    }

    fn take_overflow(&mut self) -> u64 {
        std::mem::take(&mut self.share.state.lock().queue.overflowed)
    }

    async fn detach(self: Box<Self>) {
        let (idle, generation) = {
            let mut s = self.share.state.lock();
            let mut returned = 0;
            for e in s
                .queue
                .entries
                .iter_mut()
                .filter(|e| e.holder == self.member)
            {
                e.holder = 0;
                returned += 1;
            }
            s.members -= 1;
            if returned > 0 {
                // What this member did not acknowledge goes to the others now.
                self.share.arrived.notify_waiters();
            }
            (s.members == 0, s.joined)
        };
        if !idle {
            return;
        }
        let (share, key, shares, expiry) = (self.share, self.key, self.shares, self.limits.expiry);
        // Expires the share unless a member joined meanwhile.
        tokio::spawn(async move {
            tokio::time::sleep(expiry).await;
            let Some(shares) = shares.upgrade() else {
                return;
            };
            let mut shares = shares.lock();
            let unjoined = share.state.lock().joined == generation;
            let same = shares.get(&key).is_some_and(|s| Arc::ptr_eq(s, &share));
            if unjoined && same {
                shares.remove(&key);
                share.stop();
            }
        });
    }
}
