//! Persistent MQTT sessions (DESIGN §11, issue 14): a client that connects with
//! `clean_session=0` keeps its subscriptions and the traffic that matched them while it
//! was away, on whichever node it comes back to.
//!
//! A [`SessionStore`] holds each session's record (its granted filters) and captures its
//! application's traffic while the session exists; a connection attaches to its session as
//! a [`SessionConsumer`], which hands it the stored messages in order and forgets each one
//! once acknowledged. What was handed out but never acknowledged (the connection ended,
//! its node died) is handed out again, marked redelivered, to the next connection.
//! Implementations: [`MemorySessions`] for the embedded node (sessions survive reconnects,
//! not the process) and [`JetStreamSessions`] for a cluster (NATS JetStream: one stream per
//! tenant capturing its traffic, one durable consumer per session, records in a key-value
//! bucket per tenant). Nothing outside this module knows which one runs.
//!
//! A shared subscription (`$share/{group}/{filter}`) of a persistent session is a member
//! of a share that the store keeps for all its members ([`SessionStore::join_share`]):
//! each message goes to one member, and what a member did not acknowledge goes to another.

pub mod config;
pub mod jetstream;
pub mod memory;
pub mod usage;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use config::SessionsConfig;
pub use jetstream::JetStreamSessions;
pub use memory::MemorySessions;

use crate::topic::{AppRef, Id, ShareKey};

/// Which session: one client ID of one application.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The application the client authenticated for.
    pub app: AppRef,
    /// The client ID of its CONNECT.
    pub client_id: String,
}

impl SessionKey {
    /// A name for this session made only of `[0-9a-f]` (a hash of the application and the
    /// client ID), safe in a JetStream consumer name or a key-value key whatever the
    /// client ID holds.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.app.tenant.as_str().as_bytes());
        h.update([0]);
        h.update(self.app.app.as_str().as_bytes());
        h.update([0]);
        h.update(self.client_id.as_bytes());
        data_encoding::HEXLOWER.encode(&h.finalize()[..16])
    }
}

/// One granted filter of a session, as the client wrote it, with its granted QoS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFilter {
    /// The filter as requested (before rewriting).
    pub filter: String,
    /// The granted QoS: 0 or 1.
    pub qos: u8,
}

/// The stored record of a session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The client ID (for operators reading the store).
    pub client_id: String,
    /// The granted filters.
    pub filters: Vec<SavedFilter>,
    /// The store's name of the session's current consumer (JetStream), if it has one.
    #[serde(default)]
    pub consumer: String,
}

/// One message of a session's application, held for it.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The store's number of it: what [`SessionConsumer::ack`] takes.
    pub seq: u64,
    /// The subject it was published on.
    pub subject: String,
    /// The payload.
    pub payload: Bytes,
    /// Whether it was handed to a connection before (it goes out with DUP=1 at QoS 1).
    pub redelivered: bool,
}

/// What [`SessionStore::open`] found or made.
pub struct Opened {
    /// Whether the session existed (CONNACK session present).
    pub present: bool,
    /// Its filters (none for a new session).
    pub filters: Vec<SavedFilter>,
    /// Messages waiting for it, as far as the store knows at once.
    pub pending: u64,
    /// The connection's attachment to it.
    pub consumer: Box<dyn SessionConsumer>,
}

/// What a store holds for one tenant's persistent sessions, for `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantUsage {
    /// The tenant.
    pub tenant: Id,
    /// Sessions and shared subscriptions kept (JetStream: the consumers on its stream).
    pub sessions: u64,
    /// Messages kept for them (JetStream: in the tenant's stream, each message once
    /// whatever the number of sessions it is kept for; embedded: in each queue).
    pub messages: u64,
    /// Bytes of those messages (JetStream: the stream's bytes; embedded: payload bytes).
    pub bytes: u64,
}

/// Why a session operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The store could not be reached or refused the operation.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// Another connection took the session over.
    #[error("the session was taken over by another connection")]
    TakenOver,
    /// The tenant keeps `sessions.max_sessions_per_tenant` sessions already: no new one.
    #[error("the tenant's persistent sessions are at sessions.max_sessions_per_tenant")]
    Full,
    /// Persistent sessions are off on this node (`sessions.enabled = false`).
    #[error("persistent sessions are disabled")]
    Disabled,
}

/// Where sessions are kept.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Resumes the session of `key`, or creates an empty one, and attaches to it; a
    /// connection that was attached before is detached (takeover).
    async fn open(&self, key: &SessionKey) -> Result<Opened, SessionError>;
    /// Discards the session of `key` and what it holds, if there is one (a
    /// `clean_session=1` CONNECT); whether there was one.
    async fn discard(&self, key: &SessionKey) -> Result<bool, SessionError>;
    /// Attaches a member (a connection of a persistent session) to the shared subscription
    /// `share`, made if it does not exist: the share holds its application's traffic while
    /// it exists, hands each message to one member at a time, and hands what a member did
    /// not acknowledge to another one once that member detaches (or, in JetStream, after
    /// `sessions.ack_wait`). A share without members expires after `sessions.expiry`.
    async fn join_share(&self, share: &ShareKey) -> Result<Box<dyn SessionConsumer>, SessionError>;
    /// Counts in `counter` every session that expired (as far as this store sees it).
    fn count_expiries_in(&self, _counter: prometheus_client::metrics::counter::Counter) {}
    /// What the store holds, per tenant this node has had sessions of.
    async fn usage(&self) -> Result<Vec<TenantUsage>, SessionError> {
        Ok(Vec::new())
    }
}

/// A connection's attachment to its session.
#[async_trait]
pub trait SessionConsumer: Send {
    /// The next message for the session, oldest first; waits until there is one.
    async fn next(&mut self) -> Result<Stored, SessionError>;
    /// Forgets message `seq`: it was delivered (or is not wanted).
    async fn ack(&mut self, seq: u64) -> Result<(), SessionError>;
    /// Replaces the session's filters in the store.
    async fn save(&mut self, filters: &[SavedFilter]) -> Result<(), SessionError>;
    /// Keeps the session alive while the connection lives (called now and then); the
    /// expiry starts over from here.
    async fn refresh(&mut self) -> Result<(), SessionError>;
    /// Messages dropped for the session's bounds since last asked (the oldest go first).
    fn take_overflow(&mut self) -> u64;
    /// Ends the attachment: what was handed out and not acknowledged will be handed out
    /// again to the next connection; the expiry starts now.
    async fn detach(self: Box<Self>);
}

/// A store for a node without persistent sessions: every session is clean.
pub struct NoSessions;

#[async_trait]
impl SessionStore for NoSessions {
    async fn open(&self, _key: &SessionKey) -> Result<Opened, SessionError> {
        Err(SessionError::Disabled)
    }

    async fn discard(&self, _key: &SessionKey) -> Result<bool, SessionError> {
        Ok(false)
    }

    async fn join_share(
        &self,
        _share: &ShareKey,
    ) -> Result<Box<dyn SessionConsumer>, SessionError> {
        Err(SessionError::Disabled)
    }
}
