//! The [`Registry`] of live connections on this node, by (tenant, application, client ID),
//! for client-ID takeover, key revocation and drain.
//!
//! Revocation: a connection carries the revocation [`Ticket`] taken when its login began,
//! and is closed as it registers if its key was revoked since, since the revocation
//! signal, handled between the login and the registration, had nothing to close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::auth::{Revocations, Standing, Ticket};
use crate::mqtt::outbox::{CloseReason, Outbox};
use crate::topic::AppRef;

/// What the registry knows of one connection.
pub struct Connection {
    /// Node-unique connection ID.
    pub id: u64,
    /// The application it authenticated for.
    pub app: AppRef,
    /// Its MQTT client ID.
    pub client_id: String,
    /// The ID of the API key it authenticated with.
    pub key_id: String,
    /// How to reach its task.
    pub outbox: Arc<Outbox>,
    /// When it connected (Unix milliseconds), to order takeovers between nodes.
    pub connected_at_ms: u64,
    /// The revocation ticket taken before its login began.
    pub ticket: Ticket,
}

/// Live connections of this node.
pub struct Registry {
    by_client: Mutex<HashMap<(AppRef, String), Arc<Connection>>>,
    next_id: AtomicU64,
    revocations: Arc<Revocations>,
}

impl Registry {
    /// An empty registry that checks registering connections against `revocations` (the
    /// node's, from [`crate::auth::Authenticator::revocations`]).
    pub fn new(revocations: Arc<Revocations>) -> Self {
        Self {
            by_client: Mutex::default(),
            next_id: AtomicU64::new(0),
            revocations,
        }
    }

    /// A fresh connection ID.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connection; an older one with the same client ID in the same
    /// application is told to close (takeover) and returned. The connection itself is told
    /// to close at once, and not registered, when its key was revoked since its login began.
    pub fn register(&self, conn: Arc<Connection>) -> Option<Arc<Connection>> {
        let key = (conn.app.clone(), conn.client_id.clone());
        let mut by_client = self.by_client.lock();
        // Under the registry lock: a revocation recorded after this check closes the
        // connection through `close_by_key`, which waits for the lock.
        if self.revocations.standing(&conn.key_id, conn.ticket) != Standing::Current {
            conn.outbox.close(CloseReason::KeyRevoked);
            return None;
        }
        let old = by_client.insert(key, conn);
        if let Some(old) = &old {
            old.outbox.close(CloseReason::Takeover);
        }
        old
    }

    /// Removes a connection, unless a takeover already replaced it.
    pub fn unregister(&self, conn: &Connection) {
        let key = (conn.app.clone(), conn.client_id.clone());
        let mut map = self.by_client.lock();
        if map.get(&key).is_some_and(|c| c.id == conn.id) {
            map.remove(&key);
        }
    }

    /// Closes the connection with this client ID in this application if it connected no
    /// later than `newer_than_ms` (so that of two racing connects on two nodes, the newer
    /// one survives). Returns whether one was closed.
    pub fn close_client(
        &self,
        app: &AppRef,
        client_id: &str,
        newer_than_ms: u64,
        reason: CloseReason,
    ) -> bool {
        let key = (app.clone(), client_id.to_owned());
        match self.by_client.lock().get(&key) {
            Some(c) if c.connected_at_ms <= newer_than_ms => {
                c.outbox.close(reason);
                true
            }
            _ => false,
        }
    }

    /// Closes every connection that authenticated with `key_id`; returns how many.
    pub fn close_by_key(&self, key_id: &str, reason: CloseReason) -> usize {
        let map = self.by_client.lock();
        let mut n = 0;
        for c in map.values().filter(|c| c.key_id == key_id) {
            c.outbox.close(reason);
            n += 1;
        }
        n
    }

    /// Every live connection (for drain).
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.by_client.lock().values().cloned().collect()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.by_client.lock().len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;
    use prometheus_client::metrics::counter::Counter;
    use std::time::Duration;

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    fn registry() -> Registry {
        Registry::new(Arc::new(Revocations::new(
            Duration::from_secs(60),
            100,
            Counter::default(),
        )))
    }

    fn conn(r: &Registry, at_ms: u64, key_id: &str) -> Arc<Connection> {
        Arc::new(Connection {
            id: r.next_id(),
            app: app(),
            client_id: "client-1".into(),
            key_id: key_id.into(),
            outbox: Arc::new(Outbox::new(1024)),
            connected_at_ms: at_ms,
            ticket: r.revocations.ticket(),
        })
    }

    fn closed(c: &Connection) -> Option<CloseReason> {
        c.outbox.take(&mut Vec::new())
    }

    #[test]
    fn a_key_revoked_between_login_and_registration_closes_the_connection_at_once() {
        let r = registry();
        let legit = conn(&r, 1_000, "GOOD");
        r.register(legit.clone());
        let c = conn(&r, 1_001, "KEY");
        r.revocations.record("KEY");
        assert!(r.register(c.clone()).is_none());
        assert_eq!(closed(&c), Some(CloseReason::KeyRevoked));
        assert_eq!(closed(&legit), None, "a revoked login takes nobody over");
        assert_eq!(r.len(), 1);
        // A login that began after the revocation is not affected by it.
        let later = conn(&r, 1_002, "KEY");
        r.register(later.clone());
        assert_eq!(closed(&later), None);
    }
}
