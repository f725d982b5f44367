//! The NATS [`Bus`] of a cluster node (DESIGN §1, §7), over async-nats.
//!
//! The client connects in the background and never gives up: a node starts while NATS is
//! down and reports not-ready ([`Bus::is_ready`]) until it gets through; a lost connection
//! is retried with a backoff capped at about a second, and async-nats re-sends every live
//! subscription on the new connection, so [`Subscription`] streams survive a NATS restart
//! without their owners noticing (messages published while the node was away are lost:
//! core NATS is at-most-once).
//!
//! While the connection is down, `publish` and `flush` fail fast with
//! [`BusError::Unavailable`] rather than queueing traffic that would be stale when it
//! finally left; the only exception is the first few seconds after [`NatsBus::connect`],
//! so that a short-lived process (`keys revoke`) can publish right away and `flush` until
//! the first connection is up. `subscribe` is accepted at any time and takes effect as soon
//! as the connection is (re-)established.
//!
//! A router's subscriptions ([`Bus::subscribe_counted`]) read through a bounded queue of
//! their own (`counted`), so that what an application loses when its node falls behind is
//! counted exactly, for that application, in `/metrics`.
//!
//! This module owns the NATS client; the only other module that imports async-nats is the
//! JetStream session store ([`crate::sessions::jetstream`]), through [`NatsBus::jetstream`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::timeout;

use super::{is_valid_queue_group, is_valid_subject, Bus, BusError, BusMessage, Subscription};
use crate::config::NatsConfig;

mod counted;
mod settings;

use counted::{sid_of, Counted};

/// Messages one subscription may buffer, by default (`nats.subscription_capacity`), before
/// the node is a slow consumer and NATS messages for it are dropped (and counted, see
/// [`NatsBus::dropped_messages`]). A node has one subscription per (tenant, application)
/// and its router drains it into per-client bounded outboxes at once, so this buffer only
/// absorbs scheduling hiccups; 65536 messages (async-nats' default, made explicit) is ~64
/// MB at 1 KB uplinks in the worst case, and seconds of traffic for even a very busy
/// application.
pub const SUBSCRIPTION_CAPACITY: usize = crate::config::DEFAULT_SUBSCRIPTION_CAPACITY;

/// The client's own channel per subscription holds at least this many messages (and at
/// least `nats.subscription_capacity`): for a router's subscription it is only a hand-over
/// to the subscription's counted queue, which takes everything at every poll, so it must
/// absorb what arrives while the reader is not running (async-nats' drops there are counted
/// only from its lossy events); it costs memory only while it holds messages.
const MIN_CLIENT_BUFFER: usize = 65_536;

/// Commands (publishes, subscriptions) the client queues for its connection task before
/// `publish` has to wait (async-nats' default is 2048): a node publishes downlinks, events
/// and cluster signals from many sessions at once, and a burst should not make them wait
/// behind each other.
const CLIENT_CAPACITY: usize = 16_384;

/// Longest wait between two reconnection attempts (before jitter).
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
/// Wait before the second reconnection attempt; doubles on every further attempt.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(10);
/// One connection attempt (TCP, INFO, CONNECT, PONG) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Client PING interval: how fast a silently dead connection is noticed (two missed PONGs).
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long `flush` waits for everything to be processed by the NATS server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long handing a command to the client task may take (its queue is bounded).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// After `connect`, publishing is accepted (and buffered) this long before the first
/// connection is up; afterwards only a live connection accepts publishes.
const INITIAL_GRACE: Duration = Duration::from_secs(5);
/// At most one slow-consumer warning per this interval (drops are still counted).
const SLOW_CONSUMER_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The NATS-backed bus. Clones share one connection.
#[derive(Clone)]
pub struct NatsBus {
    client: Client,
    created: Instant,
    events: Arc<EventLog>,
    /// `nats.subscription_capacity`: the queue of each [`Bus::subscribe_counted`].
    capacity: usize,
    /// This connection's own inbox for the round trip of [`Bus::flush`] (taken on the
    /// first flush), and the token of the last round trip.
    barrier: Arc<tokio::sync::Mutex<Option<Barrier>>>,
}

impl NatsBus {
    /// [`NatsBus::connect_with`] the server(s) at `url` (comma-separated for several),
    /// without other credentials than the URL's own and with TLS only as the URL or the
    /// server asks.
    pub async fn connect(url: &str, client_name: &str) -> Result<NatsBus, BusError> {
        let config = NatsConfig {
            url: url.to_owned(),
            ..NatsConfig::default()
        };
        Self::connect_with(&config, client_name).await
    }

    /// Creates a client for the NATS server(s) of `config` (several URLs are a cluster's
    /// seeds), authenticating and using TLS as configured, named `client_name` (shown by
    /// the NATS server's monitoring). Never waits for the server and never fails because
    /// it is down: the connection is made, and re-made after every loss, in the background.
    /// Fails, naming every bad key and file at once, for a URL that cannot be parsed or a
    /// credentials or certificate file that is missing, unreadable or malformed.
    pub async fn connect_with(config: &NatsConfig, client_name: &str) -> Result<NatsBus, BusError> {
        let server = format!("NATS at {}", crate::config::redact_urls(&config.url));
        let base = ConnectOptions::new()
            .name(client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .connection_timeout(CONNECT_TIMEOUT)
            .ping_interval(PING_INTERVAL)
            .client_capacity(CLIENT_CAPACITY)
            .subscription_capacity(config.subscription_capacity.max(MIN_CLIENT_BUFFER));
        let prepared = settings::prepare(config, base)
            .map_err(|problems| BusError::Settings(problems.join("; ")))?;
        let events = Arc::new(EventLog::new(
            server,
            prepared.auth_hint,
            (prepared.tls_hint, prepared.tls),
        ));
        let log = events.clone();
        let client = prepared
            .options
            .event_callback(move |event| {
                let log = log.clone();
                async move { log.record(event) }
            })
            .connect(prepared.servers)
            .await
            .map_err(|e| {
                BusError::Unavailable(format!(
                    "cannot use NATS URL {:?}: {e}",
                    crate::config::redact_urls(&config.url)
                ))
            })?;
        Ok(NatsBus {
            client,
            created: Instant::now(),
            events,
            capacity: config.subscription_capacity,
            barrier: Arc::default(),
        })
    }

    /// Sends everything buffered, then waits until the server has processed it: a message
    /// to this connection's own inbox comes back only after the server has handled every
    /// SUB and PUB sent before it (an async-nats `flush` only empties the socket buffer, so
    /// a subscription "flushed" that way may still miss a message another client publishes
    /// right after).
    async fn round_trip(&self) -> Result<(), String> {
        // The token travels behind everything published before it on this connection, so
        // its return also proves those messages reached the server: no separate flush.
        let mut guard = self.barrier.lock().await;
        let Barrier {
            inbox,
            subject,
            last,
        } = match &mut *guard {
            Some(barrier) => barrier,
            None => {
                let subject = self.client.new_inbox();
                let inbox = self
                    .client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| format!("NATS subscribe failed: {e}"))?;
                guard.insert(Barrier {
                    inbox,
                    subject,
                    last: 0,
                })
            }
        };
        *last += 1;
        let token = last.to_string();
        self.client
            .publish(subject.clone(), Bytes::from(token.clone()))
            .await
            .map_err(|e| format!("NATS publish failed: {e}"))?;
        // Tokens of earlier round trips that timed out may still arrive first.
        while let Some(m) = inbox.next().await {
            if m.payload == token.as_bytes() {
                return Ok(());
            }
        }
        Err("NATS round trip: the inbox subscription ended".into())
    }

    /// Messages dropped so far because a subscription's buffer was full (slow consumer).
    pub fn dropped_messages(&self) -> u64 {
        self.events.dropped.load(Ordering::Relaxed)
    }

    /// A client subscription to `filter`, in the queue group `group` if there is one.
    async fn subscriber(
        &self,
        filter: String,
        group: Option<String>,
    ) -> Result<async_nats::Subscriber, BusError> {
        if !is_valid_subject(&filter, true) {
            return Err(BusError::InvalidSubject(filter));
        }
        let subscribed = match group {
            Some(group) if !is_valid_queue_group(&group) => {
                return Err(BusError::InvalidSubject(group))
            }
            Some(group) => timeout(SEND_TIMEOUT, self.client.queue_subscribe(filter, group)).await,
            None => timeout(SEND_TIMEOUT, self.client.subscribe(filter)).await,
        };
        match subscribed {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(BusError::Unavailable(format!("NATS subscribe failed: {e}"))),
            Err(_) => Err(BusError::Unavailable(format!(
                "NATS client did not take the subscription within {SEND_TIMEOUT:?}"
            ))),
        }
    }

    /// A JetStream context on this bus's connection (for the persistent sessions).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }

    /// Whether a publish or flush may be handed to the client now (see the module docs).
    fn check_sendable(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            State::Pending if self.created.elapsed() < INITIAL_GRACE => Ok(()),
            State::Pending => Err(BusError::Unavailable(
                "not connected to NATS yet (still trying)".into(),
            )),
            State::Disconnected => Err(BusError::Unavailable(
                "connection to NATS lost (reconnecting)".into(),
            )),
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        if !is_valid_subject(&subject, false) {
            return Err(BusError::InvalidSubject(subject));
        }
        self.check_sendable()?;
        match timeout(SEND_TIMEOUT, self.client.publish(subject, payload)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(format!("NATS publish failed: {e}"))),
            Err(_) => Err(BusError::Unavailable(format!(
                "NATS client did not take the publish within {SEND_TIMEOUT:?}"
            ))),
        }
    }

    async fn subscribe(&self, filter: String) -> Result<Subscription, BusError> {
        let subscriber = self.subscriber(filter, None).await?;
        // Dropping the stream drops the async-nats `Subscriber`, whose `Drop` sends UNSUB.
        Ok(Box::pin(subscriber.map(|m| BusMessage {
            subject: m.subject.into_string(),
            payload: m.payload,
        })))
    }

    async fn subscribe_counted(
        &self,
        filter: String,
        dropped: Counter,
    ) -> Result<Subscription, BusError> {
        let subscriber = self.subscriber(filter, None).await?;
        let owner = Owner::new(self.events.clone(), dropped, sid_of(&subscriber));
        Ok(Box::pin(Counted::new(subscriber, self.capacity, owner)))
    }

    async fn queue_subscribe_counted(
        &self,
        filter: String,
        group: String,
        dropped: Counter,
    ) -> Result<Subscription, BusError> {
        let subscriber = self.subscriber(filter, Some(group)).await?;
        let owner = Owner::new(self.events.clone(), dropped, sid_of(&subscriber));
        Ok(Box::pin(Counted::new(subscriber, self.capacity, owner)))
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.check_sendable()?;
        match timeout(FLUSH_TIMEOUT, self.round_trip()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(e)),
            Err(_) => Err(BusError::Unavailable(format!(
                "NATS flush did not complete within {FLUSH_TIMEOUT:?}"
            ))),
        }
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn connections(&self) -> Option<watch::Receiver<u64>> {
        Some(self.events.connections.subscribe())
    }

    fn count_drops_in(&self, counter: Counter) {
        // Drops before this call are in `dropped` and are carried over.
        counter.inc_by(self.events.dropped.load(Ordering::Relaxed));
        let _ = self.events.drop_counter.set(counter);
    }
}

/// Who counts the drops of one [`Counted`] subscription: its owner's counter, the node's
/// total, and (by the client's subscription ID) the drops async-nats itself reports for it.
/// Dropping it forgets the ID.
struct Owner {
    events: Arc<EventLog>,
    dropped: Counter,
    sid: Option<u64>,
}

impl Owner {
    fn new(events: Arc<EventLog>, dropped: Counter, sid: Option<u64>) -> Self {
        match sid {
            Some(sid) => {
                events.owners.lock().insert(sid, dropped.clone());
            }
            None => tracing::warn!(
                "cannot read the NATS subscription ID: drops async-nats reports itself \
                 count for the node only"
            ),
        }
        Self {
            events,
            dropped,
            sid,
        }
    }

    /// `n` messages of this subscription were dropped.
    fn lost(&self, n: u64) {
        self.dropped.inc_by(n);
        self.events.lost(n, self.sid);
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(sid) = self.sid {
            self.events.owners.lock().remove(&sid);
        }
    }
}

/// The inbox of [`NatsBus::round_trip`].
struct Barrier {
    inbox: async_nats::Subscriber,
    subject: String,
    /// Token of the last round trip.
    last: u64,
}

/// Delay before reconnection attempt `attempts` (1-based; reset after a success): the
/// first at once, then 10 ms doubling up to [`RECONNECT_MAX_DELAY`], plus up to 25 %
/// jitter so that a fleet of nodes does not reconnect in lockstep after a NATS restart.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    let base = RECONNECT_MIN_DELAY
        .saturating_mul(1 << doublings)
        .min(RECONNECT_MAX_DELAY);
    let jitter_ms = rand::random_range(0..=base.as_millis() as u64 / 4);
    base + Duration::from_millis(jitter_ms)
}

/// Turns client events into log lines and counters.
struct EventLog {
    /// `NATS at {redacted URLs}`, for log lines.
    server: String,
    /// Added to "authorization violation": which credentials were refused.
    auth_hint: String,
    /// Added to "TLS error", and to "IO error" when this node asks for TLS: what the
    /// handshake needs.
    tls_hint: String,
    /// Whether this node asks for TLS.
    tls: bool,
    /// Connections made so far (see [`Bus::connections`]).
    connections: watch::Sender<u64>,
    dropped: AtomicU64,
    /// Where the node's total of drops is reported
    /// (`lorabroker_bus_dropped_total{reason="slow_consumer"}`).
    drop_counter: OnceLock<Counter>,
    /// The owner's counter of each [`Counted`] subscription, by client subscription ID,
    /// for the drops async-nats reports itself.
    owners: Mutex<HashMap<u64, Counter>>,
    /// When the last slow-consumer warning was logged, and drops since then.
    slow: Mutex<(Option<Instant>, u64)>,
    /// Failed connection attempts come about once a second while NATS is away: the first
    /// is logged, then reminders that back off (see [`crate::health::Outage`]).
    outage: Mutex<crate::health::Outage>,
}

impl EventLog {
    fn new(server: String, auth_hint: String, (tls_hint, tls): (String, bool)) -> Self {
        Self {
            server,
            auth_hint,
            tls_hint,
            tls,
            connections: watch::Sender::new(0),
            dropped: AtomicU64::new(0),
            drop_counter: OnceLock::new(),
            owners: Mutex::default(),
            slow: Mutex::default(),
            outage: Mutex::new(crate::health::Outage::with_reminders()),
        }
    }

    /// A connection error with what the operator should check: async-nats reports only
    /// the kind of error (`nats: authorization violation`, `nats: TLS error`).
    fn explain(&self, error: &str) -> String {
        if error.contains("authorization violation") {
            format!("{error}: {}", self.auth_hint)
        } else if error.contains("TLS error") {
            format!("{error}: {}", self.tls_hint)
        } else if self.tls && error.contains("IO error") {
            // A failed handshake (unknown CA, refused client certificate) comes as an IO
            // error, like a server that is down.
            format!("{error}: the server is unreachable, or {}", self.tls_hint)
        } else {
            error.to_owned()
        }
    }

    /// `n` messages of subscription `sid` were dropped: counted for the node, and logged
    /// at most once per [`SLOW_CONSUMER_LOG_INTERVAL`].
    fn lost(&self, n: u64, sid: Option<u64>) {
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(counter) = self.drop_counter.get() {
            counter.inc_by(n);
        }
        let mut slow = self.slow.lock();
        slow.1 += n;
        let due = slow
            .0
            .is_none_or(|at| at.elapsed() >= SLOW_CONSUMER_LOG_INTERVAL);
        if due {
            tracing::warn!(
                sid,
                dropped = slow.1,
                dropped_total = total,
                "NATS subscription is a slow consumer: messages dropped"
            );
            *slow = (Some(Instant::now()), 0);
        }
    }

    fn record(&self, event: Event) {
        match event {
            Event::Connected => {
                match self.outage.lock().succeeded(Instant::now()) {
                    Some(r) => crate::health::log(&self.server, &r, None),
                    None => tracing::info!("connected to {}", self.server),
                }
                self.connections.send_modify(|n| *n += 1);
            }
            Event::Disconnected => {
                if self.outage.lock().failed(Instant::now()).is_some() {
                    tracing::warn!("lost the connection to {}; reconnecting", self.server)
                }
            }
            Event::ClientError(e) => {
                let report = self.outage.lock().failed(Instant::now());
                if let Some(r) = report {
                    crate::health::log(&self.server, &r, Some(&self.explain(&e.to_string())));
                }
            }
            Event::SlowConsumer(sid) => {
                // The client dropped one message (it may also have lost some of these
                // reports: a lower bound).
                if let Some(owner) = self.owners.lock().get(&sid) {
                    owner.inc();
                }
                self.lost(1, Some(sid));
            }
            Event::LameDuckMode => {
                tracing::warn!("NATS server is entering lame duck mode; will reconnect")
            }
            Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
            Event::Draining | Event::Closed => tracing::info!(%event, "NATS connection"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        let second = reconnect_delay(2);
        assert!(second >= RECONNECT_MIN_DELAY && second <= RECONNECT_MIN_DELAY * 5 / 4);
        for attempts in [20, 1_000, usize::MAX] {
            let d = reconnect_delay(attempts);
            assert!(
                d >= RECONNECT_MAX_DELAY && d <= RECONNECT_MAX_DELAY * 5 / 4,
                "{d:?}"
            );
        }
    }
}
