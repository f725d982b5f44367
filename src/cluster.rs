//! Cluster signals on the bus under `lorabroker.>` (DESIGN §3, §4, §7): client-ID takeover
//! and key revocation, turned from typed [`Signal`]s into bus messages and back.
//!
//! Every node, the embedded one included, acts on signals the same way, so single-node and
//! clustered behaviour cannot differ.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::auth::{Authenticator, KeyStore, StoreError, StoredKey};
use crate::bus::{Bus, BusError, Subscription};
use crate::mqtt::outbox::CloseReason;
use crate::registry::Registry;
use crate::topic::{AppRef, Id};

/// Subject filter of every cluster signal.
pub const SIGNAL_FILTER: &str = "lorabroker.>";
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
        /// When the new connection was accepted (Unix milliseconds).
        connected_at_ms: u64,
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
    /// The key was deleted but the signal could not be sent; connected clients keep their
    /// session until their node's cache entry expires.
    #[error("key deleted, but the revocation signal could not be sent: {0}")]
    Bus(#[from] BusError),
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
    send(
        bus,
        &Signal::KeyRevoked {
            key_id: key_id.to_owned(),
        },
    )
    .await?;
    bus.flush().await?;
    Ok(removed)
}

/// What a node needs to act on signals.
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

    /// Acts on one signal.
    pub async fn handle(&self, signal: Signal) {
        match signal {
            Signal::Takeover {
                tenant,
                application,
                client_id,
                node,
                connected_at_ms,
            } => {
                if node != self.node {
                    let app = AppRef::new(tenant, application);
                    if self.registry.close_client(
                        &app,
                        &client_id,
                        connected_at_ms,
                        CloseReason::Takeover,
                    ) {
                        tracing::info!(%app, %client_id, by = %node, "client taken over by another node");
                    }
                }
            }
            Signal::KeyRevoked { key_id } => {
                self.auth.evict(&key_id).await;
                let n = self.registry.close_by_key(&key_id, CloseReason::KeyRevoked);
                tracing::info!(%key_id, connections = n, "API key revoked");
            }
        }
    }
}
