//! [`ShareMembers`]: one node's members of one shared subscription (issue 14). The bus
//! hands the node each message of the share that its queue group gave this node; here it
//! goes to one member, in turn, or to the next one when that member's outbox is full. A
//! message is dropped (and counted) only when every member's outbox is full.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Members;
use crate::mqtt::outbox::Outbox;
use crate::topic::{Filter, SubjectEvent};

/// The members of one share on a node, by connection.
pub struct ShareMembers {
    /// The share's rewritten filter (every member asked for it).
    filter: Filter,
    members: Vec<(u64, Arc<Outbox>)>,
    /// Whose turn the next message is.
    turn: AtomicUsize,
}

impl ShareMembers {
    /// No member yet, of a share of `filter`.
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            members: Vec::new(),
            turn: AtomicUsize::new(0),
        }
    }

    /// Adds connection `id`, delivering to `outbox`; whether it was not a member yet.
    pub fn add(&mut self, id: u64, outbox: &Arc<Outbox>) -> bool {
        if self.members.iter().any(|(m, _)| *m == id) {
            return false;
        }
        self.members.push((id, outbox.clone()));
        true
    }

    /// Removes connection `id`; whether it was a member.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.members.len();
        self.members.retain(|(m, _)| *m != id);
        self.members.len() < before
    }
}

impl Members for ShareMembers {
    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn offer(
        &self,
        _event: &SubjectEvent<'_>,
        rest: &str,
        mut offer: impl FnMut(&Arc<Outbox>, bool) -> bool,
    ) {
        let n = self.members.len();
        if n == 0 || !self.filter.matches(rest, '.') {
            return;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let (_, outbox) = &self.members[(turn + i) % n];
            if offer(outbox, i + 1 == n) {
                return;
            }
        }
    }
}
