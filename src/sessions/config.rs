//! `[sessions]`: persistent MQTT sessions (issue 14), typed, with their defaults and their
//! validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[sessions]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Whether `clean_session=0` gets a session that outlives its connection. Off, every
    /// session is clean (CONNACK session present 0), as in The Things Stack.
    pub enabled: bool,
    /// How long a session is kept after its connection ended; it is discarded after that.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// How long a QoS 1 message handed to a connection may stay unacknowledged in the store
    /// before the store offers it again (after a node died holding it, say).
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Messages one session may have waiting; past it the oldest are dropped when the
    /// client comes back (`lorabroker_session_overflow_dropped_total`, event
    /// `as.mqtt.session.overflow`).
    pub max_pending_messages: u64,
    /// Bytes of payload one session may have waiting in the embedded store (the oldest
    /// dropped past it, as above). With JetStream the tenant's stream bound applies.
    pub max_pending_bytes: u64,
    /// Bytes of traffic one tenant's sessions may hold in JetStream (its stream's
    /// `max_bytes`); past it the stream drops the oldest.
    pub max_tenant_bytes: i64,
    /// Persistent sessions one tenant may keep (JetStream: consumers on its stream, shared
    /// subscriptions included). A CONNECT that would create one more gets CONNACK 3
    /// (`lorabroker_connects_total{outcome="refused_sessions_full"}`); resuming one that
    /// exists always works. Each session is a JetStream consumer that every message of
    /// the tenant is matched against: unbounded, one tenant's random client IDs would
    /// slow NATS for all.
    pub max_sessions_per_tenant: u64,
    /// How long JetStream keeps a message that a session has not acknowledged.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Prefix of the JetStream streams (`{prefix}{tenant}`) and key-value buckets
    /// (`{prefix}meta-{tenant}`) that hold the sessions.
    pub stream_prefix: String,
    /// JetStream storage: `"file"` or `"memory"`.
    pub storage: String,
    /// How often a node reads what the store keeps (`lorabroker_sessions_stored`,
    /// `lorabroker_session_pending_messages`, `lorabroker_session_pending_bytes`).
    #[serde(with = "humantime_serde")]
    pub usage_interval: Duration,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            expiry: Duration::from_secs(24 * 3600),
            ack_wait: Duration::from_secs(30),
            max_pending_messages: 100_000,
            max_pending_bytes: 64 << 20,
            max_tenant_bytes: 1 << 30,
            max_sessions_per_tenant: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            stream_prefix: "lorabroker-sessions-".into(),
            storage: "file".into(),
            usage_interval: Duration::from_secs(15),
        }
    }
}

impl SessionsConfig {
    /// Appends one message per bad key (named `sessions.…`).
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.expiry < Duration::from_secs(1) {
            errors.push(format!(
                "sessions.expiry: {:?} is shorter than 1s",
                self.expiry
            ));
        }
        if self.ack_wait < Duration::from_secs(1) {
            errors.push(format!(
                "sessions.ack_wait: {:?} is shorter than 1s",
                self.ack_wait
            ));
        }
        if self.max_age < Duration::from_secs(1) {
            errors.push(format!(
                "sessions.max_age: {:?} is shorter than 1s",
                self.max_age
            ));
        }
        if self.usage_interval < Duration::from_millis(100) {
            errors.push(format!(
                "sessions.usage_interval: {:?} is shorter than 100ms",
                self.usage_interval
            ));
        }
        if self.max_sessions_per_tenant == 0 {
            errors.push("sessions.max_sessions_per_tenant: must be at least 1".into());
        }
        if self.max_pending_messages == 0 {
            errors.push("sessions.max_pending_messages: must be at least 1".into());
        }
        if self.max_pending_bytes == 0 {
            errors.push("sessions.max_pending_bytes: must be at least 1".into());
        }
        if self.max_tenant_bytes < 1024 {
            errors.push(format!(
                "sessions.max_tenant_bytes: {} is less than 1024",
                self.max_tenant_bytes
            ));
        }
        let prefix_ok = !self.stream_prefix.is_empty()
            && self.stream_prefix.len() <= 64
            && self
                .stream_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !prefix_ok {
            errors.push(format!(
                "sessions.stream_prefix: {:?} must be 1 to 64 of [A-Za-z0-9_-]",
                self.stream_prefix
            ));
        }
        if !["file", "memory"].contains(&self.storage.as_str()) {
            errors.push(format!(
                "sessions.storage: {:?} is neither \"file\" nor \"memory\"",
                self.storage
            ));
        }
    }
}
