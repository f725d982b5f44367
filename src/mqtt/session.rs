//! One MQTT connection, from the first byte to the close: one task owns the socket and the
//! session state; other tasks reach it only through its [`Outbox`].
//!
//! The session never parses bytes itself ([`super::codec`] does) and never routes
//! ([`crate::router`] does); it applies the protocol rules of DESIGN §4: connect timeout,
//! CONNACK codes, keepalive at 1.5×, maximum packet size, The Things Stack's subscription
//! rewriting, write rights, and takeover.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{field, Instrument};

use super::codec::{decode, encode, DecodeError, Decoded};
use super::connect::{accept, Accepted};
use super::outbox::{CloseReason, Outbox};
use crate::app::App;
use crate::cluster::{self, Signal};
use crate::metrics::OutcomeLabels;
use crate::registry::Connection;
use crate::topic::{parse_downlink_topic, Filter};

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
pub async fn serve(app: Arc<App>, stream: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!(
        "conn",
        %peer,
        tenant = field::Empty,
        app = field::Empty,
        client_id = field::Empty
    );
    async move {
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
            Ok(Ok(None)) => return,
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
        count_connect(&app, "accepted");
        let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
        let session = Session::new(app.clone(), accepted, keep_alive, connect.last_will);
        session.run(conn).await;
    }
    .instrument(span)
    .await
}

fn count_connect(app: &App, outcome: &'static str) {
    app.metrics
        .connects
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
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

/// Why reading a packet failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("malformed packet: {0:?}")]
    Decode(DecodeError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error("the first packet is not CONNECT (first byte {0:#04x})")]
    NotConnect(u8),
}

/// The socket with its read buffer. Buffers start empty and are given back when idle, so
/// a quiet connection holds almost no memory.
struct Wire {
    stream: TcpStream,
    read_buf: BytesMut,
    max_packet_size: usize,
}

impl Wire {
    fn new(stream: TcpStream, max_packet_size: usize) -> Self {
        Self {
            stream,
            read_buf: BytesMut::new(),
            max_packet_size,
        }
    }

    /// The next whole packet already buffered, if any.
    fn buffered_packet(&mut self) -> Result<Option<Packet>, ReadError> {
        match decode(&mut self.read_buf, self.max_packet_size) {
            Ok(Decoded::Packet(p)) => Ok(Some(p)),
            Ok(Decoded::Incomplete) => {
                if self.read_buf.is_empty() && self.read_buf.capacity() > 0 {
                    self.read_buf = BytesMut::new();
                }
                Ok(None)
            }
            Err(e) => Err(ReadError::Decode(e)),
        }
    }

    /// Reads whatever the socket has; `Ok(false)` at a clean end of stream.
    async fn fill(&mut self) -> Result<bool, ReadError> {
        loop {
            self.stream.readable().await?;
            if self.read_buf.capacity() - self.read_buf.len() < 1024 {
                self.read_buf.reserve(4096);
            }
            match self.stream.try_read_buf(&mut self.read_buf) {
                Ok(0) if self.read_buf.is_empty() => return Ok(false),
                Ok(0) => return Err(ReadError::Truncated),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the CONNECT packet; `None` at a clean end of stream. Anything that does not
    /// start like a CONNECT (an HTTP request, TLS, noise) is refused at its first byte
    /// instead of waiting for a packet that will never be whole.
    async fn read_connect(&mut self) -> Result<Option<Packet>, ReadError> {
        loop {
            if let Some(&first) = self.read_buf.first() {
                if first != 0x10 {
                    return Err(ReadError::NotConnect(first));
                }
            }
            if let Some(p) = self.buffered_packet()? {
                return Ok(Some(p));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn send_now(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.stream.write_all(&bytes).await
    }

    /// Writes every packet in `out` with as few syscalls as possible, then empties it.
    async fn write_all(&mut self, out: &mut Vec<Bytes>) -> std::io::Result<()> {
        let mut start = 0;
        while start < out.len() {
            let slices: Vec<IoSlice<'_>> = out[start..]
                .iter()
                .take(64)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut written = self.stream.write_vectored(&slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let first = &mut out[start];
                if written >= first.len() {
                    written -= first.len();
                    start += 1;
                } else {
                    first.advance(written);
                    written = 0;
                }
            }
        }
        out.clear();
        if out.capacity() > 256 {
            *out = Vec::new();
        }
        Ok(())
    }
}

/// The state of one accepted connection.
struct Session {
    app: Arc<App>,
    accepted: Accepted,
    keep_alive: Duration,
    will: Option<mqttbytes::v4::LastWill>,
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
            app: accepted.app.clone(),
            client_id: accepted.client_id.clone(),
            key_id: accepted.key.id.clone(),
            outbox: outbox.clone(),
            connected_at_ms: unix_millis(),
        });
        Self {
            app,
            accepted,
            keep_alive,
            will,
            outbox,
            registration,
            subscribed: false,
            out: Vec::new(),
        }
    }

    async fn run(mut self, mut wire: Wire) {
        if let Some(old) = self.app.registry.register(self.registration.clone()) {
            tracing::info!(old_connection = old.id, "client ID taken over on this node");
        }
        let takeover = Signal::Takeover {
            tenant: self.accepted.app.tenant.clone(),
            application: self.accepted.app.app.clone(),
            client_id: self.accepted.client_id.clone(),
            node: self.app.node_id.clone(),
            connected_at_ms: self.registration.connected_at_ms,
        };
        if self.app.draining.load(std::sync::atomic::Ordering::Acquire) {
            // Accepted while the node began to drain: leave with the others.
            self.outbox.close(CloseReason::Draining);
        }
        if let Err(e) = cluster::send(self.app.bus.as_ref(), &takeover).await {
            tracing::warn!(error = %e, "could not announce the connection to other nodes");
        }
        self.app.metrics.connections.inc();
        tracing::info!(key_id = %self.accepted.key.id, "connected");

        self.out.push(connack(ConnectReturnCode::Success));
        let end = self.main_loop(&mut wire).await;

        self.app.registry.unregister(&self.registration);
        if self.subscribed {
            self.app
                .router
                .leave(&self.accepted.app, self.registration.id);
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
                self.publish_downlink(&will.topic, &will.message).await;
            }
        }
        if let End::Closed(_) | End::KeyExpired | End::KeepaliveTimeout = end {
            let _ = wire.stream.shutdown().await;
        }
    }

    async fn main_loop(&mut self, wire: &mut Wire) -> End {
        let write_timeout = self.app.config.mqtt.write_timeout;
        // MQTT 3.1.1 §3.1.2.10: one and a half keepalive periods without a packet.
        let keepalive = (!self.keep_alive.is_zero()).then(|| self.keep_alive.mul_f32(1.5));
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let deadline = sleep_until(keepalive.map_or(far, |k| Instant::now() + k));
        tokio::pin!(deadline);
        let expiry = sleep_until(key_expiry_instant(self.accepted.key.expires_at).unwrap_or(far));
        tokio::pin!(expiry);

        loop {
            if !self.out.is_empty() {
                match timeout(write_timeout, wire.write_all(&mut self.out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Io(e.to_string()),
                    Err(_) => return End::Io(format!("write blocked for {write_timeout:?}")),
                }
            }
            tokio::select! {
                biased;
                _ = self.outbox.ready() => {
                    if let Some(reason) = self.outbox.take(&mut self.out) {
                        return End::Closed(reason);
                    }
                }
                filled = wire.fill() => {
                    match filled {
                        Ok(true) => {}
                        Ok(false) => return End::Eof,
                        Err(e) => return End::Io(e.to_string()),
                    }
                    if let Some(k) = keepalive {
                        deadline.as_mut().reset(Instant::now() + k);
                    }
                    loop {
                        match wire.buffered_packet() {
                            Ok(Some(packet)) => {
                                if let Some(end) = self.handle(packet).await {
                                    return end;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return End::Violation(e.to_string()),
                        }
                    }
                }
                _ = &mut deadline => return End::KeepaliveTimeout,
                _ = &mut expiry => return End::KeyExpired,
            }
        }
    }

    /// Handles one packet; `Some` ends the session.
    async fn handle(&mut self, packet: Packet) -> Option<End> {
        match packet {
            Packet::Publish(publish) => return self.handle_publish(publish).await,
            Packet::Subscribe(subscribe) => {
                if subscribe.filters.is_empty() {
                    return Some(End::Violation("SUBSCRIBE without filters".into()));
                }
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for f in &subscribe.filters {
                    codes.push(self.subscribe(&f.path).await);
                }
                self.out
                    .push(encode(&Packet::SubAck(SubAck::new(subscribe.pkid, codes))));
            }
            Packet::Unsubscribe(unsubscribe) => {
                if self.subscribed {
                    for f in &unsubscribe.topics {
                        let left = self.app.router.unsubscribe(
                            &self.accepted.app,
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

    /// Grants or refuses one filter (DESIGN §4): QoS 0 for a rewritten filter of the
    /// client's own application when the key may read, 0x80 otherwise.
    async fn subscribe(&mut self, requested: &str) -> SubscribeReasonCode {
        if !self.accepted.key.rights.can_read() {
            tracing::info!(
                filter = requested,
                "subscription refused: the key has no read right"
            );
            return SubscribeReasonCode::Failure;
        }
        let Some(filter) = Filter::rewrite(&self.app.tenancy, &self.accepted.app, requested) else {
            tracing::info!(
                filter = requested,
                "subscription refused: not a topic of this application"
            );
            return SubscribeReasonCode::Failure;
        };
        let (app, id) = (&self.accepted.app, self.registration.id);
        if let Err(e) = self
            .app
            .router
            .subscribe(app, id, &self.outbox, &filter)
            .await
        {
            tracing::warn!(error = %e, "subscription failed: bus unavailable");
            let left = self.app.router.unsubscribe(app, id, requested);
            self.subscribed = left > 0;
            return SubscribeReasonCode::Failure;
        }
        self.subscribed = true;
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    }

    async fn handle_publish(&mut self, publish: Publish) -> Option<End> {
        let writable = self.accepted.key.rights.can_write_down()
            && parse_downlink_topic(&self.app.tenancy, &self.accepted.app, &publish.topic)
                .is_some();
        if !writable {
            // MQTT 3.1.1 has no negative PUBACK: closing is the only refusal (DESIGN §4).
            return Some(End::Violation(format!(
                "PUBLISH to {:?} is not allowed for this key",
                publish.topic
            )));
        }
        self.publish_downlink(&publish.topic, &publish.payload)
            .await;
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
    async fn publish_downlink(&self, topic: &str, payload: &[u8]) {
        let Some((device, op)) = parse_downlink_topic(&self.app.tenancy, &self.accepted.app, topic)
        else {
            return;
        };
        let outcome = match self.app.downlinks.handle(&device, op, payload).await {
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
                tenant: self.accepted.app.tenant.to_string(),
                application: self.accepted.app.app.to_string(),
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
