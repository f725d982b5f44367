//! Cluster signals on the bus (DESIGN §3, §4, §7): client-ID takeover on
//! `lorabroker.takeover` and key revocation on `lorabroker.keys.revoked`, turned from typed
//! [`Signal`]s into bus messages and back. (Live events travel under `lorabroker.events.>`,
//! which no signal subscription covers: a node receives only the events it streams.)
//!
//! Every node, the embedded one included, acts on signals the same way, so single-node and
//! clustered behaviour cannot differ. Core NATS does not keep signals for a node that is
//! away, so after every reconnection a node catches up from the key store instead.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::auth::{Authenticator, KeyStore, StoreError, StoredKey};
use crate::bus::{Bus, BusError, Subscription};
use crate::mqtt::outbox::CloseReason;
use crate::registry::{Claim, Connection, Registry};
use crate::topic::{AppRef, Id};

/// Subject filters of the cluster signals.
pub const SIGNAL_FILTERS: [&str; 2] = [TAKEOVER_SUBJECT, "lorabroker.keys.>"];
const TAKEOVER_SUBJECT: &str = "lorabroker.takeover";
const REVOKED_SUBJECT: &str = "lorabroker.keys.revoked";

/// A message between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Signal {
    /// A client connected on `node`; other nodes close their connection with this ID.
    Takeover {
        /// Tenant of the application.
        tenant: Id,
        /// Application ID.
        application: Id,
        /// The client ID taken over.
        client_id: String,
        /// Instance ID of the node that now holds the client.
        node: String,
        /// When the new connection was accepted (Unix milliseconds): the takeover order of
        /// connections without an epoch.
        connected_at_ms: u64,
        /// The new connection's takeover epoch; absent when it has none (Redis was down),
        /// and from nodes older than epochs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// An API key was revoked: evict it and close its connections.
    KeyRevoked {
        /// The key ID.
        key_id: String,
    },
}

/// Why revoking a key failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The key store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key was deleted but the signal could not be sent: nodes refuse new connections
    /// once their cache entry expires, and close existing ones only when they next
    /// reconnect to the bus (see [`SignalHandler::catch_up`]).
    #[error("key deleted, but the revocation signal could not be sent: {0}")]
    Bus(#[from] BusError),
    /// The key was not in the store (nothing deleted), and the signal for nodes that may
    /// still cache it could not be sent either.
    #[error("key not found (nothing deleted), and the revocation signal could not be sent: {0}")]
    NotFoundNotSent(BusError),
}

impl Signal {
    /// The takeover announcement of `conn`, a connection of `node`.
    pub fn takeover(conn: &Connection, node: &str) -> Signal {
        Signal::Takeover {
            tenant: conn.app.tenant.clone(),
            application: conn.app.app.clone(),
            client_id: conn.client_id.clone(),
            node: node.to_owned(),
            connected_at_ms: conn.connected_at_ms,
            epoch: conn.epoch,
        }
    }
}

/// Publishes a signal.
pub async fn send(bus: &dyn Bus, signal: &Signal) -> Result<(), BusError> {
    let subject = match signal {
        Signal::Takeover { .. } => TAKEOVER_SUBJECT,
        Signal::KeyRevoked { .. } => REVOKED_SUBJECT,
    };
    let payload = serde_json::to_vec(signal).unwrap_or_default();
    bus.publish(subject.to_owned(), Bytes::from(payload)).await
}

/// Deletes a key and tells every node; returns the deleted record, `None` if unknown.
pub async fn revoke_key(
    store: &dyn KeyStore,
    bus: &dyn Bus,
    key_id: &str,
) -> Result<Option<StoredKey>, RevokeError> {
    let removed = store.remove(key_id).await?;
    // Signal even if this store had no record: a node may still cache it.
    let signal = Signal::KeyRevoked {
        key_id: key_id.to_owned(),
    };
    let sent = match send(bus, &signal).await {
        Ok(()) => bus.flush().await,
        Err(e) => Err(e),
    };
    match (removed, sent) {
        (removed, Ok(())) => Ok(removed),
        (Some(_), Err(e)) => Err(RevokeError::Bus(e)),
        (None, Err(e)) => Err(RevokeError::NotFoundNotSent(e)),
    }
}

/// Keys whose records one catch-up reads from the store at the same time.
const CATCH_UP_CONCURRENCY: usize = 32;

/// What a node needs to act on signals.
#[derive(Clone)]
pub struct SignalHandler {
    /// This node's instance ID (its own takeover signals are ignored).
    pub node: String,
    /// The node's connections.
    pub registry: Arc<Registry>,
    /// The node's key cache.
    pub auth: Arc<Authenticator>,
}

impl SignalHandler {
    /// Handles signals until the subscription ends.
    pub async fn run(self, mut sub: Subscription) {
        while let Some(msg) = sub.next().await {
            match serde_json::from_slice::<Signal>(&msg.payload) {
                Ok(signal) => self.handle(signal).await,
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "ignoring a malformed cluster signal")
                }
            }
        }
    }

    /// Catches up after every new bus connection until `connections` ends: revocation
    /// signals sent while this node was away from the bus never reached it, so it forgets
    /// every cached key and closes the connections whose key is no longer in the store.
    pub async fn catch_up_after_reconnections(self, mut connections: watch::Receiver<u64>) {
        while connections.changed().await.is_ok() {
            self.catch_up().await;
        }
    }

    /// Forgets every cached key and closes the connections whose key is gone; a key the
    /// store cannot be asked about now is left alone.
    pub async fn catch_up(&self) {
        self.auth.evict_all();
        let key_ids: BTreeSet<String> = self
            .registry
            .all()
            .iter()
            .map(|c| c.key_id.clone())
            .collect();
        let store = self.auth.store();
        futures::stream::iter(key_ids)
            .for_each_concurrent(CATCH_UP_CONCURRENCY, |key_id| async move {
                match store.get(&key_id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let n = self.registry.close_by_key(&key_id, CloseReason::KeyRevoked);
                        tracing::info!(%key_id, connections = n, "API key revoked while this node was away from the bus");
                    }
                    Err(e) => {
                        tracing::warn!(%key_id, error = %e, "cannot check an API key after reconnecting to the bus")
                    }
                }
            })
            .await;
    }

    /// Acts on one signal.
    pub async fn handle(&self, signal: Signal) {
        match signal {
            Signal::Takeover {
                tenant,
                application,
                client_id,
                node,
                connected_at_ms,
                epoch,
            } => {
                if node != self.node {
                    let app = AppRef::new(tenant, application);
                    let claim = Claim {
                        epoch,
                        connected_at_ms,
                        node: &node,
                    };
                    if self.registry.announced(&app, &client_id, claim, &self.node) {
                        tracing::info!(%app, %client_id, by = %node, "client taken over by another node");
                    }
                }
            }
            Signal::KeyRevoked { key_id } => {
                // The tombstone first: a login reading the key now cannot cache it after.
                self.auth.revoke(&key_id).await;
                let n = self.registry.close_by_key(&key_id, CloseReason::KeyRevoked);
                tracing::info!(%key_id, connections = n, "API key revoked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{CacheSettings, MemoryKeyStore};
    use crate::mqtt::outbox::Outbox;

    /// A node's signal handler with one connection of `client-1`, accepted at `at_ms` with
    /// `epoch`.
    fn node(name: &str, epoch: Option<u64>, at_ms: u64) -> (SignalHandler, Arc<Outbox>) {
        let auth = Arc::new(Authenticator::new(
            Arc::new(MemoryKeyStore::new()),
            &CacheSettings::default(),
        ));
        let registry = Arc::new(Registry::new(auth.revocations().clone()));
        let outbox = Arc::new(Outbox::new(1024));
        registry.register(Arc::new(Connection {
            id: registry.next_id(),
            app: app(),
            client_id: "client-1".into(),
            key_id: "KEY".into(),
            outbox: outbox.clone(),
            epoch,
            connected_at_ms: at_ms,
            ticket: auth.ticket(),
        }));
        let handler = SignalHandler {
            node: name.into(),
            registry,
            auth,
        };
        (handler, outbox)
    }

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    fn takeover(node: &str, epoch: Option<u64>, at_ms: u64) -> Signal {
        Signal::Takeover {
            tenant: app().tenant,
            application: app().app,
            client_id: "client-1".into(),
            node: node.into(),
            connected_at_ms: at_ms,
            epoch,
        }
    }

    fn closed(outbox: &Outbox) -> Option<CloseReason> {
        outbox.take(&mut Vec::new())
    }

    #[tokio::test]
    async fn the_greater_epoch_survives_crossing_signals_whatever_the_clocks() {
        // Node b's clock is behind: its connection looks older, but its epoch is greater.
        let (a, a_conn) = node("node-a", Some(7), 1_000);
        let (b, b_conn) = node("node-b", Some(8), 900);
        a.handle(takeover("node-b", Some(8), 900)).await;
        b.handle(takeover("node-a", Some(7), 1_000)).await;
        assert_eq!(closed(&a_conn), Some(CloseReason::Takeover));
        assert_eq!(closed(&b_conn), None);
    }

    #[tokio::test]
    async fn without_epochs_the_newer_connection_survives_a_takeover_race() {
        let (a, a_conn) = node("node-a", None, 1_000);
        let (b, b_conn) = node("node-b", None, 1_001);
        // The signals cross: each node hears of the other's connection.
        a.handle(takeover("node-b", None, 1_001)).await;
        b.handle(takeover("node-a", None, 1_000)).await;
        assert_eq!(closed(&a_conn), Some(CloseReason::Takeover));
        assert_eq!(closed(&b_conn), None);
    }

    #[tokio::test]
    async fn without_epochs_exactly_one_survives_connections_of_the_same_millisecond() {
        let (a, a_conn) = node("node-a", None, 1_000);
        let (b, b_conn) = node("node-b", None, 1_000);
        a.handle(takeover("node-b", None, 1_000)).await;
        b.handle(takeover("node-a", None, 1_000)).await;
        assert_eq!(closed(&a_conn), Some(CloseReason::Takeover));
        assert_eq!(
            closed(&b_conn),
            None,
            "the greater instance ID keeps its client"
        );
    }

    #[tokio::test]
    async fn a_node_ignores_its_own_takeover_signals() {
        let (a, a_conn) = node("node-a", Some(1), 1_000);
        a.handle(takeover("node-a", Some(2), 2_000)).await;
        assert_eq!(closed(&a_conn), None);
    }

    #[test]
    fn takeover_signals_without_an_epoch_still_parse() {
        let old = r#"{"type":"takeover","tenant":"tenant1","application":"app1","client_id":"c","node":"n","connected_at_ms":5}"#;
        match serde_json::from_str::<Signal>(old).unwrap() {
            Signal::Takeover { epoch, .. } => assert_eq!(epoch, None),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_revocation_signal_leaves_a_tombstone_and_closes_the_keys_connections() {
        let (a, a_conn) = node("node-a", Some(1), 1_000);
        let before = a.auth.ticket();
        a.handle(Signal::KeyRevoked {
            key_id: "KEY".into(),
        })
        .await;
        assert_eq!(closed(&a_conn), Some(CloseReason::KeyRevoked));
        assert_eq!(
            a.auth.revocations().standing("KEY", before),
            crate::auth::Standing::Revoked
        );
    }
}
