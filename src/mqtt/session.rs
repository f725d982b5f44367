//! One MQTT connection, from the first byte to the close: one task owns the socket and the
//! session state; other tasks reach it only through its [`Outbox`].
//!
//! The session never parses bytes itself ([`super::codec`] does) and never routes
//! ([`crate::router`] does); it applies the protocol rules of DESIGN §4: connect timeout
//! and CONNACK codes ([`super::handshake`]), keepalive at 1.5×, maximum packet size,
//! malformed packets, The Things Stack's subscription rewriting, write rights and
//! acknowledgements ([`super::publish`]), and takeover.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqttbytes::v4::{ConnectReturnCode, Packet, SubAck, Subscribe, SubscribeReasonCode, UnsubAck};
use mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tracing::{field, Instrument};

use super::codec::{encode, DecodeError};
use super::connect::Accepted;
use super::handshake::{connack_present, count_malformed, handshake};
use super::inflight::{publish_topic, Inflight, Overflow, Tag, Waiting};
use super::outbox::{CloseReason, Outbox};
use super::persistent::{session_feed, share_feed, Feed, ShareFeed, ToPump};
use super::publish::Qos2Ids;
use super::wire::{ReadError, Wire};
use crate::app::App;
use crate::auth::{StoredKey, Ticket};
use crate::cluster::{self, Signal};
use crate::events::{bounded, data, names};
use crate::metrics::{AppLabels, OutcomeLabels};
use crate::mqtt::codec::encode_publish;
use crate::registry::Connection;
use crate::router::{Refusal, Refusals, SubscribeError, TooManyFilters};
use crate::sessions::{Opened, SavedFilter, SessionConsumer, SessionError, SessionKey, Stored};
use crate::topic::{parse_downlink_topic, Filter, SharedFilter};
use crate::transport::{Kind, Transport};
use serde_json::Value;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum End {
    /// The client sent DISCONNECT.
    Disconnect,
    /// The client closed the socket.
    Eof,
    /// No packet within 1.5× the keepalive.
    KeepaliveTimeout,
    /// The key expired while connected.
    KeyExpired,
    /// Closed from outside (takeover, revocation, drain).
    Closed(CloseReason),
    /// The client sent a malformed packet (MQTT 3.1.1 §4.8: close the connection).
    Malformed(DecodeError),
    /// The client broke the protocol (a second CONNECT, a server-to-client packet).
    Violation(String),
    /// More QoS 2 packet IDs held than `mqtt.max_inflight_qos2` (the bound).
    Qos2InflightExceeded(usize),
    /// A QoS 1/2 downlink could not be stored because the queue backend is unavailable:
    /// closed without acknowledging it, so that the client retransmits after reconnecting.
    QueueUnavailable,
    /// The client kept publishing downlinks past a rate limit (named) for longer than
    /// `limits.downlink_disconnect_after` allows.
    RateLimited(&'static str),
    /// The socket failed.
    Io(String),
}

impl End {
    fn outcome(&self) -> &'static str {
        match self {
            End::Disconnect => "disconnect",
            End::Eof => "eof",
            End::KeepaliveTimeout => "keepalive_timeout",
            End::KeyExpired => "key_expired",
            End::Closed(r) => r.as_str(),
            End::Malformed(_) => "malformed",
            End::Violation(_) => "violation",
            End::Qos2InflightExceeded(_) => "qos2_inflight_exceeded",
            End::QueueUnavailable => "queue_unavailable",
            End::RateLimited(_) => "rate_limited",
            End::Io(_) => "io_error",
        }
    }

    /// The `reason` of the `as.mqtt.disconnect` event, and a detail when there is one.
    fn event_reason(&self) -> (&'static str, Option<String>) {
        match self {
            End::Disconnect => ("client", None),
            End::Eof => ("client", Some("closed without DISCONNECT".into())),
            End::KeepaliveTimeout => ("keepalive_timeout", None),
            End::KeyExpired => ("expired", None),
            End::Closed(CloseReason::Takeover) => ("takeover", None),
            End::Closed(CloseReason::KeyRevoked) => ("revoked", None),
            End::Closed(CloseReason::Draining) => ("drain", None),
            End::Malformed(e) => ("protocol_error", Some(e.to_string())),
            End::Violation(why) => ("protocol_error", Some(why.clone())),
            End::Qos2InflightExceeded(max) => (
                "protocol_error",
                Some(format!("more than {max} QoS 2 publishes without PUBREL")),
            ),
            End::QueueUnavailable => ("queue_unavailable", None),
            End::RateLimited(limit) => ("rate_limited", Some((*limit).to_owned())),
            End::Io(why) if why.starts_with("write blocked") => {
                ("write_blocked", Some(why.clone()))
            }
            End::Io(why) => ("io_error", Some(why.clone())),
        }
    }

    /// MQTT 3.1.1 §3.1.2.5: the will is published when the connection is lost without
    /// DISCONNECT, a protocol error included. Not when the server itself ends the session
    /// for an operational reason (takeover, revocation, expiry, drain, a queue backend
    /// that is down): acting on behalf of a revoked key or a draining node would surprise
    /// the application, and a client closed for a down backend reconnects with its will.
    fn publishes_will(&self) -> bool {
        matches!(
            self,
            End::Eof
                | End::KeepaliveTimeout
                | End::Malformed(_)
                | End::Violation(_)
                | End::Qos2InflightExceeded(_)
                | End::Io(_)
        )
    }
}

/// Serves one accepted TCP connection, over the layers of its listener's `transport`,
/// until it closes.
///
/// Every connection's task holds this future for its whole life, so it is kept small
/// (a test checks its size): the handshake and the packets that wait on a backend run in
/// allocations of their own, and no argument is held twice (a plain `fn` returning an
/// `async` block; an `async fn` would store its arguments both as captures and as locals).
pub fn serve(
    app: Arc<App>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Arc<Transport>,
) -> impl Future<Output = ()> {
    let span = tracing::info_span!(
        "conn",
        listener = transport.kind().as_str(),
        peer = field::Empty,
        tenant = field::Empty,
        app = field::Empty,
        client_id = field::Empty
    );
    if !transport.proxy_protocol() {
        // Behind a PROXY header the client's address is known once the header is read.
        span.record("peer", field::display(peer));
    }
    // Boxed: the handshake (CONNECT, key lookup) is a large future that the task of an
    // established connection should not keep room for.
    let handshake = Box::pin(handshake(app, tcp, peer, transport));
    async move {
        let Some((mut session, mut wire, _admitted)) = handshake.await else {
            return;
        };
        session.run(&mut wire).await;
    }
    .instrument(span)
}

fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// A packet handled at once, or the handling that waits on a backend.
enum Handled<'a> {
    Done(Option<End>),
    Wait(futures::future::BoxFuture<'a, Option<End>>),
}

/// What ended a wait of the main loop.
enum Wake {
    /// The outbox has packets or a close.
    Outbox,
    /// The socket was read.
    Read(Result<bool, ReadError>),
    /// A pump of the persistent session (its feed number) handed over a stored message
    /// (`None`: it stopped).
    Stored(u32, Option<Stored>),
    /// The keepalive or key expiry timer fired.
    Timer,
}

/// The state of one accepted connection.
pub(super) struct Session {
    pub(super) app: Arc<App>,
    /// The key the client authenticated with (its application and client ID are in
    /// `registration`).
    pub(super) key: Arc<StoredKey>,
    keep_alive: Duration,
    /// The will, only when its topic is writable for the key (the handshake decided).
    will: Option<Box<mqttbytes::v4::LastWill>>,
    outbox: Arc<Outbox>,
    pub(super) registration: Arc<Connection>,
    /// Whether the router holds filters of this connection.
    subscribed: bool,
    /// Publishes refused on this connection so far (for the rate of their log lines).
    pub(super) refused: u32,
    /// Rate-limited downlinks less accepted ones (never below 0): past
    /// `limits.downlink_disconnect_after` the connection is closed.
    pub(super) rate_limited: u32,
    /// Whether this connection holds a place in the connection quotas.
    quota_held: bool,
    /// QoS 2 packet IDs between PUBREC and PUBREL.
    pub(super) qos2: Qos2Ids,
    /// Packets waiting to be written.
    pub(super) out: Vec<Bytes>,
    /// The client's address (the PROXY header's when there is one) and listener, for
    /// the live events.
    remote: SocketAddr,
    transport: Kind,
    /// QoS 1 and persistent-session state, for the connections that use them (boxed: the
    /// others, most of them, carry a pointer).
    durable: Option<Box<Durable>>,
    /// CONNACK's session present.
    session_present: bool,
}

/// A connection's QoS 1 deliveries and persistent session.
struct Durable {
    /// Granted QoS 1 filters of a clean session (the router delivers their messages as QoS
    /// 0 PUBLISHes, which this connection sends as QoS 1).
    qos1: Vec<Filter>,
    /// Shared subscriptions of a clean session (the router delivers them), with their QoS.
    shares: Vec<(SharedFilter, u8)>,
    inflight: Inflight,
    /// `v3/{app uid}/`
    topic_prefix: String,
    /// The persistent session, when the client has one.
    attached: Option<Attached>,
}

/// A connection's end of its persistent session's pump.
struct Attached {
    /// Every granted plain filter with its QoS (the router is not used: the session's store
    /// delivers its application's traffic).
    filters: Vec<(Filter, u8)>,
    /// The session's own feed (number 0); it stops when the session is taken over.
    own: Feed,
    /// The shared subscriptions, each fed by its share.
    shares: Vec<ShareFeed>,
    /// The number of the next share feed.
    next_feed: u32,
    /// `v3.{tenant}.{app}.`
    subject_prefix: String,
}

impl Attached {
    /// The feed numbered `id`.
    fn feed(&self, id: u32) -> Option<&Feed> {
        if id == 0 {
            return Some(&self.own);
        }
        self.shares.iter().find(|s| s.id == id).map(|s| &s.feed)
    }

    /// Joins the share of `shared` at `qos`, for the session of `key`, over `joined` if
    /// the store was joined already.
    fn join(
        &mut self,
        app: &Arc<App>,
        key: SessionKey,
        (shared, qos): (SharedFilter, u8),
        joined: Option<Box<dyn SessionConsumer>>,
    ) {
        self.next_feed += 1;
        let feed = share_feed(app, key, &shared, joined);
        self.shares.push(ShareFeed {
            shared,
            qos,
            id: self.next_feed,
            feed,
        });
    }

    /// How many filters it holds, shared ones included.
    fn len(&self) -> usize {
        self.filters.len() + self.shares.len()
    }
}

impl Session {
    pub(super) fn new(
        app: Arc<App>,
        accepted: Accepted,
        (keep_alive, persistent): (Duration, Option<Opened>),
        will: Option<mqttbytes::v4::LastWill>,
        quota_held: bool,
        (epoch, ticket): (Option<u64>, Ticket),
        (remote, transport): (SocketAddr, Kind),
    ) -> Self {
        let outbox = Arc::new(Outbox::new(app.config.mqtt.outbound_buffer_bytes));
        let registration = Arc::new(Connection {
            id: app.registry.next_id(),
            app: accepted.app,
            client_id: accepted.client_id,
            key_id: accepted.key.id.clone(),
            outbox: outbox.clone(),
            epoch,
            connected_at_ms: unix_millis(),
            ticket,
        });
        let mut session = Self {
            app,
            key: accepted.key,
            keep_alive,
            will: will.map(Box::new),
            outbox,
            registration,
            subscribed: false,
            refused: 0,
            rate_limited: 0,
            quota_held,
            qos2: Qos2Ids::default(),
            out: Vec::new(),
            remote,
            transport,
            durable: None,
            session_present: false,
        };
        if let Some(opened) = persistent {
            session.attach(opened);
        }
        session
    }

    /// The QoS 1 state, made on first use.
    fn durable(&mut self) -> &mut Durable {
        let app = &self.app;
        let registration = &self.registration;
        self.durable.get_or_insert_with(|| {
            Box::new(Durable {
                qos1: Vec::new(),
                shares: Vec::new(),
                inflight: Inflight::new(
                    app.config.mqtt.max_inflight,
                    app.config.mqtt.outbound_buffer_bytes,
                ),
                topic_prefix: format!("v3/{}/", app.tenancy.app_uid(&registration.app)),
                attached: None,
            })
        })
    }

    /// Attaches this connection to its persistent session: restores its filters and
    /// starts the pumps of its stored messages (the session's own, and one per share).
    fn attach(&mut self, opened: Opened) {
        self.session_present = opened.present;
        let key = self.session_key();
        let own = session_feed(&self.app, key.clone(), opened.consumer);
        let mut attached = Attached {
            filters: Vec::with_capacity(opened.filters.len()),
            own,
            shares: Vec::new(),
            next_feed: 0,
            subject_prefix: self.registration.app.subject_prefix(),
        };
        let (tenancy, app) = (&self.app.tenancy, &self.registration.app);
        let max_len = self.app.config.mqtt.max_filter_length;
        for saved in &opened.filters {
            // A stored record is input too: a filter the node would no longer grant is
            // dropped, never trusted.
            let qos = saved.qos.min(1);
            let granted = match SharedFilter::grant(tenancy, app, &saved.filter, max_len) {
                Some(Ok(shared)) => {
                    // Its share exists in the store (it outlives its members by the
                    // expiry): the pump joins it.
                    attached.join(&self.app, key.clone(), (shared, qos), None);
                    continue;
                }
                Some(Err(e)) => Err(e),
                None => Filter::grant(tenancy, app, &saved.filter, max_len),
            };
            match granted {
                Ok(f) => attached.filters.push((f, qos)),
                Err(e) => tracing::info!(error = %e, "a stored filter of the session is dropped"),
            }
        }
        tracing::info!(
            present = opened.present,
            pending = opened.pending,
            filters = attached.filters.len(),
            shares = attached.shares.len(),
            "persistent session attached"
        );
        self.durable().attached = Some(attached);
    }

    /// This connection's session.
    fn session_key(&self) -> SessionKey {
        SessionKey {
            app: self.registration.app.clone(),
            client_id: self.registration.client_id.clone(),
        }
    }

    /// Hands one stored message of feed `feed` of the persistent session to the client:
    /// at the highest QoS of the plain filters it matches (the session's own feed) or at
    /// the share's QoS (a share's feed), or acknowledged at once if it matches none.
    fn deliver_stored(&mut self, feed: u32, stored: Stored) {
        let Some(d) = self.durable.as_deref_mut() else {
            return;
        };
        let Some(attached) = d.attached.as_ref() else {
            return;
        };
        let ack = |attached: &Attached| {
            if let Some(f) = attached.feed(feed) {
                f.ack(stored.seq);
            }
        };
        let Some(rest) = stored
            .subject
            .strip_prefix(attached.subject_prefix.as_str())
        else {
            return ack(attached);
        };
        let qos = if feed == 0 {
            attached
                .filters
                .iter()
                .filter(|(f, _)| f.matches(rest, '.'))
                .map(|(_, q)| *q)
                .max()
        } else {
            attached
                .shares
                .iter()
                .find(|s| s.id == feed && s.shared.filter.matches(rest, '.'))
                .map(|s| s.qos)
        };
        let Some(qos) = qos else {
            return ack(attached);
        };
        let Some(packet) = encode_publish(&d.topic_prefix, rest, b'.', &stored.payload) else {
            tracing::warn!(
                len = stored.payload.len(),
                "stored message too large to frame as MQTT"
            );
            return ack(attached);
        };
        self.app.metrics.delivered.inc();
        if qos == 0 {
            self.out.push(packet);
            return ack(attached);
        }
        let waiting = Waiting {
            packet,
            seq: Some(Tag {
                feed,
                seq: stored.seq,
            }),
            dup: stored.redelivered,
        };
        // Stored messages are taken only while the window has room, so this one goes now.
        match d.inflight.offer(waiting) {
            Ok(Some(p)) => {
                self.app.metrics.inflight.inc();
                self.out.push(p);
            }
            Ok(None) => {}
            Err(Overflow) => ack(attached),
        }
    }

    /// Sends as QoS 1 the packets from `from` on in `out` that a QoS 1 filter of this
    /// clean session matches (in order, within the window; what does not fit waits, and
    /// what does not fit the waiting bytes is dropped and counted).
    fn upgrade_to_qos1(&mut self, from: usize) {
        let Some(d) = self.durable.as_deref_mut() else {
            return;
        };
        let qos1_shares = || {
            d.shares
                .iter()
                .filter(|(_, q)| *q == 1)
                .map(|(s, _)| &s.filter)
        };
        if (d.qos1.is_empty() && qos1_shares().next().is_none()) || from >= self.out.len() {
            return;
        }
        let mut dropped = 0u64;
        let mut kept = Vec::with_capacity(self.out.len());
        for packet in self.out.drain(from..) {
            let rest = publish_topic(&packet).and_then(|t| t.strip_prefix(d.topic_prefix.as_str()));
            let wants_qos1 = rest.is_some_and(|rest| {
                d.qos1
                    .iter()
                    .chain(qos1_shares())
                    .any(|f| f.matches(rest, '/'))
            });
            if !wants_qos1 {
                kept.push(packet);
                continue;
            }
            let waiting = Waiting {
                packet,
                seq: None,
                dup: false,
            };
            match d.inflight.offer(waiting) {
                Ok(Some(p)) => {
                    self.app.metrics.inflight.inc();
                    kept.push(p);
                }
                Ok(None) => {}
                Err(Overflow) => dropped += 1,
            }
        }
        self.out.extend(kept);
        if dropped > 0 {
            self.app
                .metrics
                .dropped
                .get_or_create(&AppLabels {
                    tenant: self.registration.app.tenant.to_string(),
                    application: self.registration.app.app.to_string(),
                })
                .inc_by(dropped);
        }
    }

    /// A PUBACK: frees its place in the window, acknowledges a stored message to its
    /// session, and sends what waited for room.
    fn handle_puback(&mut self, id: u16) {
        let Some(d) = self.durable.as_deref_mut() else {
            return;
        };
        match d.inflight.acked(id) {
            Some(seq) => {
                self.app.metrics.inflight.dec();
                if let Some(feed) =
                    seq.and_then(|t| Some((d.attached.as_ref()?.feed(t.feed)?, t.seq)))
                {
                    feed.0.ack(feed.1);
                }
            }
            // A PUBACK for nothing in flight (a client acknowledging twice): ignored.
            None => return,
        }
        let before = d.inflight.len();
        d.inflight.release(&mut self.out);
        let sent = d.inflight.len() - before;
        self.app.metrics.inflight.inc_by(sent as i64);
    }

    /// Emits the live event `name` of this connection's application, with its client ID
    /// and `fields`.
    pub(super) fn event<const N: usize>(&self, name: &str, fields: [(&str, Value); N]) {
        let mut data = data([("client_id", bounded(&self.registration.client_id))]);
        data.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
        self.app.events.emit(&self.registration.app, name, data);
    }

    /// Counts the messages this client will never get because its connection ended with
    /// them queued or half written (a blocked write, a takeover, a drain), as
    /// `lorabroker_dropped_messages_total` of its application, like the ones a full
    /// outbox drops; from here on the router counts its refused pushes itself.
    fn count_unwritten(&mut self) {
        self.outbox.finish(&mut self.out);
        let publishes = self
            .out
            .iter()
            .filter(|p| p.first().is_some_and(|b| b >> 4 == 3))
            .count() as u64;
        self.out = Vec::new();
        if publishes > 0 {
            self.app
                .metrics
                .dropped
                .get_or_create(&AppLabels {
                    tenant: self.registration.app.tenant.to_string(),
                    application: self.registration.app.app.to_string(),
                })
                .inc_by(publishes);
        }
    }

    async fn run(&mut self, wire: &mut Wire) {
        if let Some(old) = self.app.registry.register(self.registration.clone()) {
            tracing::info!(old_connection = old.id, "client ID taken over on this node");
        }
        if self.app.draining.load(std::sync::atomic::Ordering::Acquire) {
            // Accepted while the node began to drain: leave with the others.
            self.outbox.close(CloseReason::Draining);
        }
        // Boxed, like the handshake: only the first moments of a connection need it.
        Box::pin(self.announce()).await;
        self.app.metrics.connections.inc();
        tracing::info!(key_id = %self.key.id, "connected");
        self.event(
            names::CONNECT,
            [
                ("remote_addr", self.remote.to_string().into()),
                ("key_id", self.key.id.clone().into()),
                ("transport", self.transport.as_str().into()),
                ("node", self.app.node_id.clone().into()),
            ],
        );

        self.out.push(connack_present(
            ConnectReturnCode::Success,
            self.session_present,
        ));
        let end = self.main_loop(wire).await;
        self.count_unwritten();
        if let Some(d) = self.durable.take() {
            // Dropping the session's end stops its pumps, which hand what the client did
            // not acknowledge back to the store for the next connection (or member).
            self.app.metrics.inflight.dec_by(d.inflight.len() as i64);
            for (shared, _) in &d.shares {
                self.app
                    .router
                    .leave_share(&shared.key, self.registration.id);
            }
        }

        self.app.registry.unregister(&self.registration);
        if self.quota_held {
            let (app, key) = (&self.registration.app, &self.key.id);
            Box::pin(self.app.limits.quotas.release(app, key)).await;
        }
        if self.subscribed {
            self.app
                .router
                .leave(&self.registration.app, self.registration.id);
        }
        self.app.metrics.connections.dec();
        self.app
            .metrics
            .disconnects
            .get_or_create(&OutcomeLabels {
                outcome: end.outcome(),
            })
            .inc();
        match &end {
            End::Violation(why) | End::Io(why) => {
                tracing::info!(reason = end.outcome(), detail = %why, "connection closed")
            }
            End::Malformed(e) => {
                count_malformed(&self.app, e);
                tracing::info!(reason = end.outcome(), detail = %e, "connection closed")
            }
            End::Qos2InflightExceeded(max) => tracing::info!(
                reason = end.outcome(),
                "connection closed: more than mqtt.max_inflight_qos2 = {max} QoS 2 \
                 publishes without PUBREL"
            ),
            _ => tracing::info!(reason = end.outcome(), "connection closed"),
        }
        let (reason, detail) = end.event_reason();
        self.event(
            names::DISCONNECT,
            [
                ("remote_addr", self.remote.to_string().into()),
                ("key_id", self.key.id.clone().into()),
                ("reason", reason.into()),
                ("detail", detail.as_deref().map_or(Value::Null, bounded)),
            ],
        );
        if end.publishes_will() {
            if let Some(will) = self.will.take() {
                // The handshake kept the will only for a writable downlink topic.
                if let Some((device, op)) =
                    parse_downlink_topic(&self.app.tenancy, &self.registration.app, &will.topic)
                {
                    let published = Box::pin(self.publish_downlink(&device, op, &will.message));
                    if let Err(e) = published.await {
                        if e.retry_helps() {
                            // No client is left to retransmit it.
                            tracing::warn!(error = %e, "will lost: the downlink queue is unavailable");
                        }
                    }
                }
            }
        }
        if let End::Closed(_) | End::KeyExpired | End::KeepaliveTimeout | End::RateLimited(_) = end
        {
            wire.shutdown().await;
        }
    }

    /// Tells the other nodes that this client ID connected here, so that they close an
    /// older connection with the same client ID (takeover across nodes).
    async fn announce(&self) {
        let takeover = Signal::takeover(&self.registration, &self.app.node_id);
        if let Err(e) = cluster::send(self.app.bus.as_ref(), &takeover).await {
            tracing::warn!(error = %e, "could not announce the connection to other nodes");
        }
    }

    async fn main_loop(&mut self, wire: &mut Wire) -> End {
        let write_timeout = self.app.config.mqtt.write_timeout;
        // MQTT 3.1.1 §3.1.2.10: one and a half keepalive periods without a packet.
        let keepalive = (!self.keep_alive.is_zero()).then(|| self.keep_alive.mul_f32(1.5));
        let expiry = key_expiry_instant(self.key.expiry());
        // One timer for both the keepalive and the key expiry: a timer is a tenth of an
        // idle connection's memory.
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut keepalive_at = keepalive.map(|k| Instant::now() + k);
        let next = |keepalive_at: Option<Instant>| {
            keepalive_at.into_iter().chain(expiry).min().unwrap_or(far)
        };
        let timer = sleep_until(next(keepalive_at));
        tokio::pin!(timer);
        // Packets read together with the CONNECT are handled first, right behind the
        // CONNACK, without waiting for more bytes (§3.1.4: a client may send them before
        // it sees the CONNACK).
        let mut buffered = true;

        loop {
            while buffered {
                let packet = match wire.buffered_packet() {
                    Ok(Some(packet)) => packet,
                    Ok(None) => {
                        buffered = false;
                        break;
                    }
                    Err(ReadError::Decode(e)) => return End::Malformed(e),
                    Err(e) => return End::Violation(e.to_string()),
                };
                let end = match self.handle(packet) {
                    Handled::Done(end) => end,
                    Handled::Wait(backend) => backend.await,
                };
                if let Some(end) = end {
                    return end;
                }
            }
            if !self.out.is_empty() {
                // The write deadline borrows the timer, and only once a write blocks: a
                // write that completes at once (the usual case) touches no timer.
                let mut start = 0;
                let mut armed = false;
                let written = poll_fn(|cx| {
                    if let Poll::Ready(r) = wire.poll_write(cx, &mut self.out, &mut start) {
                        return Poll::Ready(r.map_err(|e| End::Io(e.to_string())));
                    }
                    if !armed {
                        armed = true;
                        timer.as_mut().reset(Instant::now() + write_timeout);
                    }
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(End::Io(format!(
                            "write blocked for {write_timeout:?}"
                        )))),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                if let Err(end) = written {
                    // Keep only what was not written, for the count at the end.
                    self.out.drain(..start);
                    return end;
                }
                if armed {
                    timer.as_mut().reset(next(keepalive_at));
                }
                self.out.clear();
            }
            // Waiting is a poll function over the outbox, the socket and the timer rather
            // than a select over three futures: an idle connection's task holds no future
            // state but the timer.
            let (outbox, out, durable) = (&self.outbox, &mut self.out, &mut self.durable);
            let woke = poll_fn(|cx| {
                if outbox.poll_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
                }
                if let Some(d) = durable.as_deref_mut() {
                    // Stored messages are taken only while the window has room: the rest
                    // wait in the store, not here.
                    if let Some(a) = d.attached.as_mut().filter(|_| d.inflight.has_room()) {
                        let shares = a.shares.iter_mut().map(|s| (s.id, &mut s.feed));
                        for (id, feed) in std::iter::once((0, &mut a.own)).chain(shares) {
                            if feed.ended {
                                continue;
                            }
                            if let Poll::Ready(stored) = feed.from_pump.poll_recv(cx) {
                                return Poll::Ready(Wake::Stored(id, stored));
                            }
                        }
                    }
                }
                if let Poll::Ready(filled) = wire.poll_fill(cx) {
                    return Poll::Ready(Wake::Read(filled));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                // Going idle: give back the outbound buffers (the session's and the
                // outbox's, which trade places at every take). An idle connection then
                // holds no buffer; a busy one never gets here between two batches.
                if out.capacity() > 0 {
                    *out = Vec::new();
                    outbox.release_idle();
                }
                Poll::Pending
            })
            .await;
            let filled = match woke {
                Wake::Outbox => {
                    let from = self.out.len();
                    if let Some(reason) = self.outbox.take(&mut self.out) {
                        return End::Closed(reason);
                    }
                    self.upgrade_to_qos1(from);
                    continue;
                }
                Wake::Stored(feed, Some(stored)) => {
                    self.deliver_stored(feed, stored);
                    continue;
                }
                Wake::Stored(feed, None) => {
                    let Some(a) = self
                        .durable
                        .as_deref_mut()
                        .and_then(|d| d.attached.as_mut())
                    else {
                        continue;
                    };
                    if feed == 0 {
                        // The session's pump stops only when it was taken over elsewhere.
                        a.own.ended = true;
                        return End::Closed(CloseReason::Takeover);
                    }
                    if let Some(s) = a.shares.iter_mut().find(|s| s.id == feed) {
                        tracing::warn!("the pump of a shared subscription stopped");
                        s.feed.ended = true;
                    }
                    continue;
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if keepalive_at.is_some_and(|at| at <= now) {
                        return End::KeepaliveTimeout;
                    }
                    if expiry.is_some_and(|at| at <= now) {
                        return End::KeyExpired;
                    }
                    timer.as_mut().reset(next(keepalive_at));
                    continue;
                }
                Wake::Read(filled) => filled,
            };
            match filled {
                Ok(true) => {}
                Ok(false) => return End::Eof,
                Err(e) => return End::Io(e.to_string()),
            }
            if let Some(k) = keepalive {
                keepalive_at = Some(Instant::now() + k);
                timer.as_mut().reset(next(keepalive_at));
            }
            buffered = true;
        }
    }

    async fn handle_subscribe(&mut self, subscribe: Subscribe) -> Option<End> {
        if subscribe.filters.is_empty() {
            return Some(End::Violation("SUBSCRIBE without filters".into()));
        }
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        if !self.app.limits.allow_subscribe(self.registration.id) {
            // Over limits.subscribes_per_connection: every filter refused, the router
            // untouched (counted by the limits).
            tracing::debug!(
                filters = subscribe.filters.len(),
                "SUBSCRIBE refused: over limits.subscribes_per_connection"
            );
            codes.resize(subscribe.filters.len(), SubscribeReasonCode::Failure);
            self.event(
                names::SUBSCRIBE_FAIL,
                [
                    ("filter", bounded(&subscribe.filters[0].path)),
                    ("reason", "rate_limited".into()),
                    ("filters", subscribe.filters.len().into()),
                ],
            );
            self.out
                .push(encode(&Packet::SubAck(SubAck::new(subscribe.pkid, codes))));
            return None;
        }
        let mut refusals = Refusals::default();
        let mut first_refused = None;
        for (i, f) in subscribe.filters.iter().enumerate() {
            // One packet may carry thousands of filters: let the other connections of this
            // worker thread run between batches.
            if i % 64 == 63 {
                tokio::task::yield_now().await;
            }
            codes.push(match self.subscribe(&f.path, f.qos).await {
                Ok(QoS::AtMostOnce) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                Ok(_) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                Err(refusal) => {
                    refusals.add(&refusal, &f.path);
                    first_refused.get_or_insert((f.path.as_str(), refusal.reason()));
                    SubscribeReasonCode::Failure
                }
            });
        }
        // One log line and one event per packet, however many filters it refused.
        refusals.report(&self.app.metrics, subscribe.filters.len());
        if codes.iter().any(|c| *c != SubscribeReasonCode::Failure) {
            // The session's filters are stored before the SUBACK promises them.
            self.save_session_filters().await;
        }
        if let Some((filter, reason)) = first_refused {
            self.event(
                names::SUBSCRIBE_FAIL,
                [
                    ("filter", bounded(filter)),
                    ("reason", reason.into()),
                    ("refused", refusals.count().into()),
                ],
            );
        }
        self.out
            .push(encode(&Packet::SubAck(SubAck::new(subscribe.pkid, codes))));
        None
    }

    /// Stores the persistent session's filters (nothing for a clean session); a store that
    /// does not answer is logged, and the filters are stored with the session's next
    /// refresh.
    async fn save_session_filters(&mut self) {
        let Some(attached) = self.durable.as_ref().and_then(|d| d.attached.as_ref()) else {
            return;
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let _ = attached
            .own
            .to_pump
            .send(ToPump::Save(saved_filters(attached), done));
        match tokio::time::timeout(SAVE_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not store the session's filters"),
            _ => tracing::warn!("the session store did not store the filters in time"),
        }
    }

    /// Handles one packet; an end of `Some` ends the session.
    fn handle(&mut self, packet: Packet) -> Handled<'_> {
        match packet {
            // The two packets that wait on a backend run in an allocation of their own, so
            // that the task of every connection does not carry their state while idle.
            Packet::Publish(p) => Handled::Wait(Box::pin(self.handle_publish(p))),
            Packet::Subscribe(s) => Handled::Wait(Box::pin(self.handle_subscribe(s))),
            other => Handled::Done(self.handle_now(other)),
        }
    }

    /// Handles a packet that needs no backend; `Some` ends the session.
    fn handle_now(&mut self, packet: Packet) -> Option<End> {
        match packet {
            Packet::Unsubscribe(unsubscribe) => {
                let topics = &unsubscribe.topics;
                if let Some(attached) = self.durable.as_mut().and_then(|d| d.attached.as_mut()) {
                    attached
                        .filters
                        .retain(|(f, _)| !topics.contains(&f.requested));
                    // A share's pump stops with its feed, handing back what is unacknowledged.
                    attached
                        .shares
                        .retain(|s| !topics.contains(&s.shared.requested));
                    let (done, _) = tokio::sync::oneshot::channel();
                    let _ = attached
                        .own
                        .to_pump
                        .send(ToPump::Save(saved_filters(attached), done));
                } else {
                    let (app, id) = (&self.registration.app, self.registration.id);
                    if let Some(d) = self.durable.as_deref_mut() {
                        d.qos1.retain(|f| !topics.contains(&f.requested));
                        d.shares.retain(|(s, _)| {
                            let keep = !topics.contains(&s.requested);
                            if !keep {
                                self.app.router.leave_share(&s.key, id);
                            }
                            keep
                        });
                    }
                    if self.subscribed {
                        for f in topics {
                            let left = self.app.router.unsubscribe(app, id, f);
                            self.subscribed = left > 0;
                        }
                    }
                }
                self.out
                    .push(encode(&Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))));
            }
            Packet::PingReq => self.out.push(encode(&Packet::PingResp)),
            Packet::Disconnect => return Some(End::Disconnect),
            Packet::PubRel(rel) => self.handle_pubrel(rel.pkid),
            Packet::PubAck(ack) => self.handle_puback(ack.pkid),
            // We send QoS 0 and 1 only; tolerate strays.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Connect(_) => return Some(End::Violation("second CONNECT".into())),
            other => {
                return Some(End::Violation(format!(
                    "{} is a server-to-client packet",
                    packet_kind(&other)
                )))
            }
        }
        None
    }

    /// Grants or refuses one filter (DESIGN §4, issue 9, issue 14): QoS 0, or QoS 1 when
    /// QoS 1 or 2 is asked, for a rewritten filter of the client's own application that
    /// can match some of its traffic, within the connection's limits
    /// (`mqtt.max_filter_length`, `mqtt.max_subscriptions`), when the key may read; 0x80
    /// otherwise, for the reason returned. A persistent session keeps its filters itself
    /// (its store delivers); a clean one subscribes in the router.
    async fn subscribe(&mut self, requested: &str, qos: QoS) -> Result<QoS, Refusal> {
        if !self.key.rights.can_read() {
            return Err(Refusal::NoReadRight);
        }
        let granted = match qos {
            QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        let mqtt = &self.app.config.mqtt;
        let (app, id) = (&self.registration.app, self.registration.id);
        let max_len = mqtt.max_filter_length;
        if let Some(shared) = SharedFilter::grant(&self.app.tenancy, app, requested, max_len) {
            self.subscribe_shared(shared?, granted).await?;
            return Ok(granted);
        }
        let filter = Filter::grant(&self.app.tenancy, app, requested, max_len)?;
        let max = mqtt.max_subscriptions;
        if let Some(attached) = self.durable.as_mut().and_then(|d| d.attached.as_mut()) {
            let q = granted as u8;
            let same = attached
                .filters
                .iter()
                .position(|(f, _)| f.requested == filter.requested);
            match same {
                Some(at) => attached.filters[at] = (filter, q),
                None if attached.len() >= max => {
                    return Err(SubscribeError::from(TooManyFilters { max }).into())
                }
                None => attached.filters.push((filter, q)),
            }
            return Ok(granted);
        }
        // Shared subscriptions take places of the same limit.
        let shares = self.durable.as_ref().map_or(0, |d| d.shares.len());
        // Set before the router is asked, so that the connection leaves it at its end
        // whatever happens (leaving an application one has no filter in is a lookup).
        self.subscribed = true;
        self.app
            .router
            .subscribe(app, id, &self.outbox, &filter, max.saturating_sub(shares))
            .await?;
        if granted == QoS::AtLeastOnce {
            let d = self.durable();
            d.qos1.retain(|f| f.requested != filter.requested);
            d.qos1.push(filter);
        } else if let Some(d) = self.durable.as_deref_mut() {
            d.qos1.retain(|f| f.requested != filter.requested);
        }
        Ok(granted)
    }
}

impl Session {
    /// Grants the shared subscription `shared` at `qos` (issue 14), within
    /// `mqtt.max_subscriptions` with the plain filters: a member of its share in the
    /// persistent session's store, or in the router for a clean session. Asking again for
    /// the same share changes its QoS only.
    async fn subscribe_shared(&mut self, shared: SharedFilter, qos: QoS) -> Result<(), Refusal> {
        let max = self.app.config.mqtt.max_subscriptions;
        let too_many = || Refusal::from(SubscribeError::from(TooManyFilters { max }));
        let q = qos as u8;
        let key = self.session_key();
        if let Some(attached) = self.durable.as_mut().and_then(|d| d.attached.as_mut()) {
            if let Some(s) = attached
                .shares
                .iter_mut()
                .find(|s| s.shared.requested == shared.requested)
            {
                s.qos = q;
                return Ok(());
            }
            if attached.len() >= max {
                return Err(too_many());
            }
            // Joined before the SUBACK: a new share captures from here on.
            let joined =
                tokio::time::timeout(SAVE_TIMEOUT, self.app.sessions.join_share(&shared.key))
                    .await
                    .unwrap_or_else(|_| Err(SessionError::Unavailable("no answer in time".into())))
                    .map_err(Refusal::Session)?;
            if let Some(attached) = self.durable.as_mut().and_then(|d| d.attached.as_mut()) {
                attached.join(&self.app, key, (shared, q), Some(joined));
            }
            return Ok(());
        }
        let (app, id) = (&self.registration.app, self.registration.id);
        let plain = self.app.router.filters(app, id);
        let d = self.durable();
        if let Some((_, old)) = d
            .shares
            .iter_mut()
            .find(|(s, _)| s.requested == shared.requested)
        {
            *old = q;
            return Ok(());
        }
        if plain + d.shares.len() >= max {
            return Err(too_many());
        }
        self.app
            .router
            .join_share(&shared, id, &self.outbox)
            .await?;
        self.durable().shares.push((shared, q));
        Ok(())
    }
}

/// How long a SUBSCRIBE waits for the session store to keep its filters.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A persistent session's filters as stored.
fn saved_filters(attached: &Attached) -> Vec<SavedFilter> {
    let plain = attached.filters.iter().map(|(f, qos)| (&f.requested, *qos));
    let shared = attached.shares.iter().map(|s| (&s.shared.requested, s.qos));
    plain
        .chain(shared)
        .map(|(filter, qos)| SavedFilter {
            filter: filter.clone(),
            qos,
        })
        .collect()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The monotonic instant at which a key expiring at `expires_at` (Unix seconds) expires;
/// `None` for never, and for an expiry too far ahead to be an instant (checked arithmetic:
/// no stored value may panic a session).
fn key_expiry_instant(expires_at: Option<u64>) -> Option<Instant> {
    let expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(expires_at?))?;
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now().checked_add(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Backends;
    use crate::config::Config;

    /// Every connection's task holds the `serve` future for its whole life, and most of an
    /// idle connection's memory is that future (issue 4 targets at most 2 KiB of broker
    /// memory per idle, subscribed connection): keep it from growing back.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let app = App::new(Config::default(), Backends::embedded(10));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let transport = Arc::new(Transport::tcp(false, Duration::from_secs(10)));
        let size = std::mem::size_of_val(&serve(app, stream, peer, transport));
        assert!(size <= 768, "the serve future is {size} bytes");
    }

    #[test]
    fn any_key_expiry_becomes_an_instant_or_never_without_panicking() {
        let millennium = Duration::from_secs(1000 * 31_557_600);
        for far in [u64::MAX, 300_000_000_000 * 31_557_600, i64::MAX as u64] {
            let at = key_expiry_instant(Some(far));
            assert!(
                at.is_none_or(|at| at > Instant::now() + millennium),
                "{far}"
            );
        }
        assert_eq!(key_expiry_instant(None), None);
        let now = Instant::now();
        assert!(key_expiry_instant(Some(0)).is_some_and(|at| at <= Instant::now() && at >= now));
        let in_a_century = crate::auth::store::unix_now() + crate::auth::MAX_KEY_LIFETIME.as_secs();
        assert!(key_expiry_instant(Some(in_a_century)).is_some_and(|at| at > now));
    }
}
