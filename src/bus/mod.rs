//! The [`Bus`]: publish/subscribe between nodes and the upstream (DESIGN §1, §7).
//!
//! Device traffic travels on `v3.{tenant}.{app}.devices.{dev}.{event…}`; cluster signals on
//! `lorabroker.>`. Subjects use NATS syntax everywhere (`*` one token, `>` the rest), also
//! on the embedded bus, so both implementations behave the same. Nothing outside this
//! module knows which implementation runs.

pub mod embedded;
pub mod nats;

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use embedded::EmbeddedBus;
pub use nats::NatsBus;

/// One message received from the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusMessage {
    /// The concrete subject it was published on.
    pub subject: String,
    /// The payload, forwarded unchanged.
    pub payload: Bytes,
}

/// A live subscription; dropping it unsubscribes.
pub type Subscription = Pin<Box<dyn Stream<Item = BusMessage> + Send>>;

/// Why a bus operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The bus could not be reached.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The bus settings are unusable (a bad URL, a missing or malformed credentials or
    /// certificate file); each problem names its key.
    #[error("{0}")]
    Settings(String),
    /// The subject or filter is not valid NATS syntax.
    #[error("invalid subject {0:?}")]
    InvalidSubject(String),
}

/// Publish/subscribe transport. Implementations: [`EmbeddedBus`] and [`NatsBus`].
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes `payload` on `subject` (no wildcards).
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), BusError>;
    /// Subscribes to a subject filter (`*` and `>` allowed).
    async fn subscribe(&self, filter: String) -> Result<Subscription, BusError>;
    /// Subscribes like [`Bus::subscribe`], counting in `dropped` every message this
    /// subscription loses because its reader fell too far behind (a NATS slow consumer),
    /// for whoever owns it (an application's router). A bus that never drops ignores it.
    async fn subscribe_counted(
        &self,
        filter: String,
        _dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<Subscription, BusError> {
        self.subscribe(filter).await
    }
    /// Subscribes like [`Bus::subscribe_counted`] as a member of the queue group `group`:
    /// each message matching `filter` goes to one member of the group, whichever node
    /// holds it (a shared subscription's members, issue 14), not to every member.
    async fn queue_subscribe_counted(
        &self,
        filter: String,
        group: String,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Result<Subscription, BusError>;
    /// Makes sure everything published and subscribed so far has reached the bus: once it
    /// returns, a message anyone publishes reaches the subscriptions taken before (what a
    /// SUBACK promises), and what was published is no longer only in this process.
    async fn flush(&self) -> Result<(), BusError>;
    /// Whether the bus is connected now.
    fn is_ready(&self) -> bool;

    /// A counter of the connections made so far, which changes on every new one (a
    /// reconnection after an outage included), so that a node can catch up on what it may
    /// have missed meanwhile (cluster signals). `None` for a bus that never disconnects.
    fn connections(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Counts in `counter` every message the bus drops before a subscription's owner gets
    /// it (a NATS slow consumer), whichever subscription lost it: the node's total. A bus
    /// that never drops ignores it.
    fn count_drops_in(&self, _counter: prometheus_client::metrics::counter::Counter) {}
}

/// Whether a NATS subject `filter` (`*`, `>`) matches a concrete `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for f in filter.split('.') {
        match (f, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// Valid NATS queue group name: 1 to 128 bytes of `[A-Za-z0-9_-]` (the names this
/// product makes are digests, so nothing a client writes reaches the bus as a name).
pub fn is_valid_queue_group(group: &str) -> bool {
    (1..=128).contains(&group.len())
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Valid NATS subject: non-empty tokens, no whitespace; with `wildcards`, `*` as a whole
/// token and `>` only as the whole last token.
pub fn is_valid_subject(subject: &str, wildcards: bool) -> bool {
    if subject.is_empty() || subject.contains(char::is_whitespace) {
        return false;
    }
    let mut tokens = subject.split('.').peekable();
    while let Some(t) = tokens.next() {
        let last = tokens.peek().is_none();
        let ok = match t {
            "" => false,
            "*" => wildcards,
            ">" => wildcards && last,
            t => !t.contains(['*', '>']),
        };
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(subject_matches("v3.t.a.>", "v3.t.a.devices.d.up"));
        assert!(!subject_matches("v3.t.a.>", "v3.t.a"));
        assert!(subject_matches(
            "v3.*.a.devices.*.up",
            "v3.t.a.devices.d.up"
        ));
        assert!(!subject_matches(
            "v3.*.a.devices.*.up",
            "v3.t.a.devices.d.up.normalized"
        ));
        assert!(!subject_matches("v3.t.b.>", "v3.t.a.devices.d.up"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }

    #[test]
    fn validity() {
        assert!(is_valid_subject("v3.t.a.>", true));
        assert!(!is_valid_subject("v3.t.a.>", false));
        assert!(!is_valid_subject("v3..a", true));
        assert!(!is_valid_subject("v3.>.a", true));
        assert!(!is_valid_subject("v3.a b", true));
        assert!(!is_valid_subject("", true));
    }
}
