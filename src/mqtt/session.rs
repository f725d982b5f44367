//! One MQTT connection, from the first byte to the close: one task owns the socket and the
//! session state; other tasks reach it only through its [`Outbox`].
//!
//! The session never parses bytes itself ([`super::codec`] does) and never routes
//! ([`crate::router`] does); it applies the protocol rules of DESIGN §4: connect timeout,
//! CONNACK codes, keepalive at 1.5×, maximum packet size, The Things Stack's subscription
//! rewriting, write rights, and takeover.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck,
};
use mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{field, Instrument};

use super::codec::{encode, DecodeError};
use super::connect::{accept, Accepted};
use super::outbox::{CloseReason, Outbox};
use super::wire::{ReadError, Wire};
use crate::app::App;
use crate::auth::StoredKey;
use crate::cluster::{self, Signal};
use crate::metrics::OutcomeLabels;
use crate::registry::Connection;
use crate::router::{Refusal, Refusals};
use crate::topic::{parse_downlink_topic, DeviceRef, DownlinkOp, Filter};

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
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
    /// The client broke the protocol or its rights; the connection is closed.
    Violation(String),
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
            End::Violation(_) => "violation",
            End::Io(_) => "io_error",
        }
    }

    /// MQTT 3.1.1 §3.1.2.5: the will is published when the connection is lost without
    /// DISCONNECT. Not when the server itself ends the session for an operational reason
    /// (takeover, revocation, expiry, drain): acting on behalf of a revoked key or a
    /// draining node would surprise the application.
    fn publishes_will(&self) -> bool {
        matches!(
            self,
            End::Eof | End::KeepaliveTimeout | End::Violation(_) | End::Io(_)
        )
    }
}

/// Serves one accepted TCP connection until it closes.
///
/// Every connection's task holds this future for its whole life, so it is kept small
/// (a test checks its size): the handshake and the packets that wait on a backend run in
/// allocations of their own, and no argument is held twice (a plain `fn` returning an
/// `async` block; an `async fn` would store its arguments both as captures and as locals).
pub fn serve(app: Arc<App>, stream: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> {
    let span = tracing::info_span!(
        "conn",
        %peer,
        tenant = field::Empty,
        app = field::Empty,
        client_id = field::Empty
    );
    // Boxed: the handshake (CONNECT, key lookup) is a large future that the task of an
    // established connection should not keep room for.
    let handshake = Box::pin(handshake(app, stream));
    async move {
        let Some((mut session, mut wire)) = handshake.await else {
            return;
        };
        session.run(&mut wire).await;
    }
    .instrument(span)
}

/// Reads and decides the CONNECT; `None` when the connection ends here (refused,
/// timed out, closed).
async fn handshake(app: Arc<App>, stream: TcpStream) -> Option<(Session, Wire)> {
    let _ = stream.set_nodelay(true);
    let mut conn = Wire::new(stream, app.config.mqtt.max_packet_size);
    let connect_timeout = app.config.mqtt.connect_timeout;
    let connect = match timeout(connect_timeout, conn.read_connect()).await {
        Err(_) => {
            tracing::debug!("no CONNECT within {connect_timeout:?}");
            return count_connect(&app, "timeout");
        }
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            tracing::debug!(packet = ?packet_kind(&other), "first packet is not CONNECT");
            return count_connect(&app, "protocol_error");
        }
        Ok(Ok(None)) => return None,
        Ok(Err(ReadError::Decode(
            DecodeError::InvalidProtocol | DecodeError::InvalidProtocolLevel(_),
        ))) => {
            let _ = conn
                .send_now(connack(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return count_connect(&app, "refused_protocol");
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "unreadable CONNECT");
            return count_connect(&app, "protocol_error");
        }
    };
    let accepted = match accept(
        &connect,
        &app.tenancy,
        &app.auth,
        app.config.mqtt.max_client_id_len,
        || format!("lorabroker-{}", ulid::Ulid::new()),
    )
    .await
    {
        Ok(a) => a,
        Err(refusal) => {
            tracing::info!(reason = %refusal, "connection refused");
            let _ = conn.send_now(connack(refusal.code())).await;
            return count_connect(&app, refusal.outcome());
        }
    };
    let span = tracing::Span::current();
    span.record("tenant", field::display(&accepted.app.tenant));
    span.record("app", field::display(&accepted.app.app));
    span.record("client_id", field::display(&accepted.client_id));
    count_connect::<()>(&app, "accepted");
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let session = Session::new(app, accepted, keep_alive, connect.last_will);
    Some((session, conn))
}

/// Counts a CONNECT outcome; `None`, for the handshake to return.
fn count_connect<T>(app: &App, outcome: &'static str) -> Option<T> {
    app.metrics
        .connects
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    None
}

fn connack(code: ConnectReturnCode) -> Bytes {
    encode(&Packet::ConnAck(ConnAck::new(code, false)))
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
    /// The keepalive or key expiry timer fired.
    Timer,
}

/// The state of one accepted connection.
struct Session {
    app: Arc<App>,
    /// The key the client authenticated with (its application and client ID are in
    /// `registration`).
    key: Arc<StoredKey>,
    keep_alive: Duration,
    will: Option<Box<mqttbytes::v4::LastWill>>,
    outbox: Arc<Outbox>,
    registration: Arc<Connection>,
    /// Whether the router holds filters of this connection.
    subscribed: bool,
    /// Packets waiting to be written.
    out: Vec<Bytes>,
}

impl Session {
    fn new(
        app: Arc<App>,
        accepted: Accepted,
        keep_alive: Duration,
        will: Option<mqttbytes::v4::LastWill>,
    ) -> Self {
        let outbox = Arc::new(Outbox::new(app.config.mqtt.outbound_buffer_bytes));
        let registration = Arc::new(Connection {
            id: app.registry.next_id(),
            app: accepted.app,
            client_id: accepted.client_id,
            key_id: accepted.key.id.clone(),
            outbox: outbox.clone(),
            connected_at_ms: unix_millis(),
        });
        Self {
            app,
            key: accepted.key,
            keep_alive,
            will: will.map(Box::new),
            outbox,
            registration,
            subscribed: false,
            out: Vec::new(),
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

        self.out.push(connack(ConnectReturnCode::Success));
        let end = self.main_loop(wire).await;

        self.app.registry.unregister(&self.registration);
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
            _ => tracing::info!(reason = end.outcome(), "connection closed"),
        }
        if end.publishes_will() {
            if let Some(will) = self.will.take() {
                // CONNECT accepted the will only for a writable downlink topic.
                if let Some((device, op)) =
                    parse_downlink_topic(&self.app.tenancy, &self.registration.app, &will.topic)
                {
                    Box::pin(self.publish_downlink(&device, op, &will.message)).await;
                }
            }
        }
        if let End::Closed(_) | End::KeyExpired | End::KeepaliveTimeout = end {
            wire.shutdown().await;
        }
    }

    /// Tells the other nodes that this client ID connected here, so that they close an
    /// older connection with the same client ID (takeover across nodes).
    async fn announce(&self) {
        let takeover = Signal::Takeover {
            tenant: self.registration.app.tenant.clone(),
            application: self.registration.app.app.clone(),
            client_id: self.registration.client_id.clone(),
            node: self.app.node_id.clone(),
            connected_at_ms: self.registration.connected_at_ms,
        };
        if let Err(e) = cluster::send(self.app.bus.as_ref(), &takeover).await {
            tracing::warn!(error = %e, "could not announce the connection to other nodes");
        }
    }

    async fn main_loop(&mut self, wire: &mut Wire) -> End {
        let write_timeout = self.app.config.mqtt.write_timeout;
        // MQTT 3.1.1 §3.1.2.10: one and a half keepalive periods without a packet.
        let keepalive = (!self.keep_alive.is_zero()).then(|| self.keep_alive.mul_f32(1.5));
        let expiry = key_expiry_instant(self.key.expires_at);
        // One timer for both the keepalive and the key expiry: a timer is a tenth of an
        // idle connection's memory.
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut keepalive_at = keepalive.map(|k| Instant::now() + k);
        let next = |keepalive_at: Option<Instant>| {
            keepalive_at.into_iter().chain(expiry).min().unwrap_or(far)
        };
        let timer = sleep_until(next(keepalive_at));
        tokio::pin!(timer);

        loop {
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
            let (outbox, out) = (&self.outbox, &mut self.out);
            let woke = poll_fn(|cx| {
                if outbox.poll_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
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
                    if let Some(reason) = self.outbox.take(&mut self.out) {
                        return End::Closed(reason);
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
            loop {
                let packet = match wire.buffered_packet() {
                    Ok(Some(packet)) => packet,
                    Ok(None) => break,
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
        }
    }

    async fn handle_subscribe(&mut self, subscribe: Subscribe) -> Option<End> {
        if subscribe.filters.is_empty() {
            return Some(End::Violation("SUBSCRIBE without filters".into()));
        }
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut refusals = Refusals::default();
        for (i, f) in subscribe.filters.iter().enumerate() {
            // One packet may carry thousands of filters: let the other connections of this
            // worker thread run between batches.
            if i % 64 == 63 {
                tokio::task::yield_now().await;
            }
            codes.push(match self.subscribe(&f.path).await {
                Ok(()) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                Err(refusal) => {
                    refusals.add(&refusal, &f.path);
                    SubscribeReasonCode::Failure
                }
            });
        }
        // One log line per packet, however many filters it refused.
        refusals.report(&self.app.metrics, subscribe.filters.len());
        self.out
            .push(encode(&Packet::SubAck(SubAck::new(subscribe.pkid, codes))));
        None
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
                if self.subscribed {
                    for f in &unsubscribe.topics {
                        let left = self.app.router.unsubscribe(
                            &self.registration.app,
                            self.registration.id,
                            f,
                        );
                        self.subscribed = left > 0;
                    }
                }
                self.out
                    .push(encode(&Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))));
            }
            Packet::PingReq => self.out.push(encode(&Packet::PingResp)),
            Packet::Disconnect => return Some(End::Disconnect),
            Packet::PubRel(rel) => self
                .out
                .push(encode(&Packet::PubComp(PubComp::new(rel.pkid)))),
            // We only send QoS 0, so there is nothing to acknowledge; tolerate strays.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
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

    /// Grants or refuses one filter (DESIGN §4, issue 9): QoS 0 for a rewritten filter of
    /// the client's own application that can match some of its traffic, within the
    /// connection's limits (`mqtt.max_filter_length`, `mqtt.max_subscriptions`), when the
    /// key may read; 0x80 otherwise, for the reason returned.
    async fn subscribe(&mut self, requested: &str) -> Result<(), Refusal> {
        if !self.key.rights.can_read() {
            return Err(Refusal::NoReadRight);
        }
        let mqtt = &self.app.config.mqtt;
        let (app, id) = (&self.registration.app, self.registration.id);
        let filter = Filter::grant(&self.app.tenancy, app, requested, mqtt.max_filter_length)?;
        // Set before the router is asked, so that the connection leaves it at its end
        // whatever happens (leaving an application one has no filter in is a lookup).
        self.subscribed = true;
        self.app
            .router
            .subscribe(app, id, &self.outbox, &filter, mqtt.max_subscriptions)
            .await?;
        Ok(())
    }

    async fn handle_publish(&mut self, publish: Publish) -> Option<End> {
        let target =
            parse_downlink_topic(&self.app.tenancy, &self.registration.app, &publish.topic)
                .filter(|_| self.key.rights.can_write_down());
        let Some((device, op)) = target else {
            // MQTT 3.1.1 has no negative PUBACK: closing is the only refusal (DESIGN §4).
            return Some(End::Violation(format!(
                "PUBLISH to {:?} is not allowed for this key",
                publish.topic
            )));
        };
        self.publish_downlink(&device, op, &publish.payload).await;
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self
                .out
                .push(encode(&Packet::PubAck(PubAck::new(publish.pkid)))),
            QoS::ExactlyOnce => self
                .out
                .push(encode(&Packet::PubRec(PubRec::new(publish.pkid)))),
        }
        None
    }

    /// Hands a downlink publish (or the will) to the downlink service. Failures are
    /// reported to the application by the service as `down/failed` events.
    async fn publish_downlink(&self, device: &DeviceRef, op: DownlinkOp, payload: &[u8]) {
        let outcome = match self.app.downlinks.handle(device, op, payload).await {
            Ok(n) => {
                tracing::debug!(device = %device.device, ?op, items = n, "downlinks queued");
                "queued"
            }
            Err(e) => {
                tracing::info!(device = %device.device, ?op, error = %e, "downlink rejected");
                e.name()
            }
        };
        self.app
            .metrics
            .downlinks
            .get_or_create(&crate::metrics::DownlinkLabels {
                tenant: self.registration.app.tenant.to_string(),
                application: self.registration.app.app.to_string(),
                outcome,
            })
            .inc();
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The monotonic instant at which a key expiring at `expires_at` (Unix seconds) expires.
fn key_expiry_instant(expires_at: Option<u64>) -> Option<Instant> {
    let expires_at = UNIX_EPOCH + Duration::from_secs(expires_at?);
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Some(Instant::now() + left)
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
        let size = std::mem::size_of_val(&serve(app, stream, peer));
        assert!(size <= 768, "the serve future is {size} bytes");
    }
}
