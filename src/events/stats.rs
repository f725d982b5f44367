//! [`TrafficStats`]: this node's message counters per application, for
//! `GET /api/v1/applications/{app}/stats`: PUBLISH packets received from the application's
//! clients (`messages_in`), delivered to them (`messages_out`) and dropped for slow ones
//! (`dropped`). At most `events.max_stats_applications` applications are counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Serialize;

use crate::topic::AppRef;

/// The counters of one application on this node.
#[derive(Default, Debug)]
pub struct AppCounters {
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    dropped: AtomicU64,
}

impl AppCounters {
    /// One PUBLISH received from a client.
    pub fn received(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// PUBLISH packets handed to clients and dropped for slow ones.
    pub fn sent(&self, delivered: u64, dropped: u64) {
        self.messages_out.fetch_add(delivered, Ordering::Relaxed);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// A snapshot of an application's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// PUBLISH packets received from the application's clients.
    pub messages_in: u64,
    /// PUBLISH packets delivered to them.
    pub messages_out: u64,
    /// PUBLISH packets dropped because a client's outbound buffer was full.
    pub dropped: u64,
}

/// The counters of every application seen on this node (bounded).
pub struct TrafficStats {
    apps: RwLock<HashMap<AppRef, Arc<AppCounters>>>,
    capacity: usize,
}

impl TrafficStats {
    /// Counters for at most `capacity` applications.
    pub fn new(capacity: usize) -> Self {
        Self {
            apps: RwLock::default(),
            capacity,
        }
    }

    /// The counters of `app`, created if there is room; `None` when the node counts
    /// `capacity` other applications already.
    pub fn of(&self, app: &AppRef) -> Option<Arc<AppCounters>> {
        if let Some(c) = self.apps.read().get(app) {
            return Some(c.clone());
        }
        let mut apps = self.apps.write();
        if let Some(c) = apps.get(app) {
            return Some(c.clone());
        }
        if apps.len() >= self.capacity {
            return None;
        }
        Some(apps.entry(app.clone()).or_default().clone())
    }

    /// What was counted for `app` (zeros when nothing was).
    pub fn get(&self, app: &AppRef) -> Counts {
        self.apps
            .read()
            .get(app)
            .map_or_else(Counts::default, |c| Counts {
                messages_in: c.messages_in.load(Ordering::Relaxed),
                messages_out: c.messages_out.load(Ordering::Relaxed),
                dropped: c.dropped.load(Ordering::Relaxed),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    #[test]
    fn counts_are_per_application_and_bounded() {
        let stats = TrafficStats::new(2);
        let a = stats.of(&app("app1")).unwrap();
        a.received();
        a.sent(3, 1);
        stats.of(&app("app1")).unwrap().received();
        assert_eq!(
            stats.get(&app("app1")),
            Counts {
                messages_in: 2,
                messages_out: 3,
                dropped: 1
            }
        );
        assert!(stats.of(&app("app2")).is_some());
        assert!(stats.of(&app("app3")).is_none(), "over the capacity");
        assert_eq!(stats.get(&app("app3")), Counts::default());
    }
}
