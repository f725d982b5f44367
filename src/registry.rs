//! The [`Registry`] of live connections on this node, by (tenant, application, client ID),
//! for client-ID takeover, key revocation and drain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

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
}

/// Live connections of this node.
#[derive(Default)]
pub struct Registry {
    by_client: Mutex<HashMap<(AppRef, String), Arc<Connection>>>,
    next_id: AtomicU64,
}

impl Registry {
    /// A fresh connection ID.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connection; an older one with the same client ID in the same
    /// application is told to close (takeover) and returned.
    pub fn register(&self, conn: Arc<Connection>) -> Option<Arc<Connection>> {
        let key = (conn.app.clone(), conn.client_id.clone());
        let old = self.by_client.lock().insert(key, conn);
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
