//! The CONNECT phase of a connection: read the CONNECT within the connect timeout, answer
//! what cannot go on (another protocol version gets CONNACK 0x01, MQTT-3.1.2-2; a refusal
//! gets its code), decide the will, and hand an accepted client to its [`Session`].
//!
//! Packets the client sent behind the CONNECT stay in the [`Wire`]'s buffer for the
//! session, which handles them right after queueing the CONNACK (§3.1.4 lets a client
//! send before it sees the CONNACK).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::field;

use super::codec::{encode, DecodeError};
use super::connect::{accept, Refused};
use super::publish::{write_target, Target};
use super::session::Session;
use super::wire::{ReadError, Wire};
use crate::app::App;
use crate::events::{bounded, data, names};
use crate::limits::Admission as Quota;
use crate::log::{Bounded, Verdict};
use crate::metrics::{OutcomeLabels, ReasonLabels, TransportLabels};
use crate::sessions::SessionError;
use crate::topic::AppRef;
use crate::transport::{Kind, Stream, Transport};

/// Reads and decides the CONNECT; `None` when the connection ends here (refused,
/// timed out, evicted, closed). An accepted client comes with its connection permit.
///
/// Until its CONNECT is read the socket holds a pending-handshake slot, which a newer
/// socket may take (see [`super::admission`]); from then on it holds nothing of that bound.
pub(super) async fn handshake(
    app: Arc<App>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Arc<Transport>,
) -> Option<(Session, Wire, OwnedSemaphorePermit)> {
    let (slot, _) = app.admission.admit();
    let _ = tcp.set_nodelay(true);
    let max_packet_size = app.config.mqtt.max_packet_size;
    let connect_timeout = app.config.mqtt.connect_timeout;
    let max_connect = app
        .config
        .mqtt
        .max_connect_size
        .min(app.config.mqtt.max_packet_size);
    // The layers below MQTT (PROXY header, TLS, WebSocket) and then the CONNECT, both in
    // the pending-handshake slot, each under its own timeout.
    let phases = async {
        let (stream, peer) = if transport.has_handshake() {
            match timeout(
                transport.handshake_timeout(),
                transport.establish(tcp, peer),
            )
            .await
            {
                Ok(Ok(established)) => established,
                Ok(Err(e)) => return Err((e.reason(), e.to_string())),
                Err(_) => {
                    let why = format!("not established within {:?}", transport.handshake_timeout());
                    return Err(("handshake_timeout", why));
                }
            }
        } else {
            (Stream::Tcp(tcp), peer)
        };
        let mut conn = Wire::new(stream, max_packet_size);
        let read = timeout(connect_timeout, conn.read_connect(max_connect)).await;
        Ok((conn, peer, read))
    };
    let (mut conn, peer, read) = tokio::select! {
        phases = phases => match phases {
            Ok(done) => done,
            Err((reason, why)) => {
                tracing::debug!(listener = transport.kind().as_str(), error = %Bounded::message(&why), "connection failed below MQTT");
                app.metrics
                    .transport_failures
                    .get_or_create(&TransportLabels { listener: transport.kind().as_str(), reason })
                    .inc();
                return count_connect(&app, "transport_failed");
            }
        },
        () = slot.evicted() => {
            tracing::debug!("closed without CONNECT: its pending-handshake slot went to a newer socket");
            return count_connect(&app, "handshake_evicted");
        }
    };
    if transport.proxy_protocol() {
        // The client's address is the PROXY header's: logs and per-IP limits use it.
        tracing::Span::current().record("peer", field::display(peer));
        if !app.limits.allow_accept(peer.ip()) {
            tracing::debug!("connection closed: over limits.accepts_per_ip");
            return count_connect(&app, "refused_accepts_per_ip");
        }
    }
    let remote = peer;
    let peer = peer.ip();
    drop(slot);
    let connect = match read {
        Err(_) => {
            tracing::debug!("no CONNECT within {connect_timeout:?}");
            return count_connect(&app, "timeout");
        }
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(_))) => {
            tracing::debug!("first packet is not CONNECT");
            return count_connect(&app, "protocol_error");
        }
        Ok(Ok(None)) => return None,
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedProtocol(what)))) => {
            tracing::debug!(what = %Bounded::id(&what), "CONNECT refused: unsupported protocol version");
            let _ = conn
                .send_now(connack(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            // Counted before the close, so that whoever sees the close sees the count.
            let counted = count_connect(&app, "refused_protocol");
            // MQTT-3.1.2-2: CONNACK 0x01, then close (with a FIN, so the CONNACK is read).
            conn.shutdown().await;
            return counted;
        }
        Ok(Err(e @ ReadError::ConnectTooLarge { .. })) => {
            if let Some(suppressed) = may_log(&app, peer) {
                tracing::info!(error = %e, suppressed, "CONNECT refused");
            }
            app.metrics
                .malformed_packets
                .get_or_create(&ReasonLabels {
                    reason: "connect_too_large",
                })
                .inc();
            return count_connect(&app, "connect_too_large");
        }
        Ok(Err(ReadError::Decode(e))) => {
            tracing::debug!(error = %Bounded::message(&e.to_string()), "malformed CONNECT");
            count_malformed(&app, &e);
            return count_connect(&app, "protocol_error");
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "unreadable CONNECT");
            return count_connect(&app, "protocol_error");
        }
    };
    // The live events of a refusal go to the application the username names.
    let fail = |app_ref: &AppRef, error: &str| {
        connect_failed(&app, app_ref, &connect, remote, transport.kind(), error)
    };
    let named = || {
        connect
            .login
            .as_ref()
            .and_then(|l| app.tenancy.parse_app(&l.username).ok())
    };
    if app.limits.is_banned(peer).await {
        if let Some(named) = named() {
            fail(&named, "too many failed connects from this address");
        }
        // Over limits.failed_connects_per_ip: refused for the cool-down with the code a bad
        // key gets, without asking the key store (counted by the limits).
        tracing::debug!("CONNECT refused: too many failed logins from this address");
        let _ = conn
            .send_now(connack(ConnectReturnCode::NotAuthorized))
            .await;
        return count_connect(&app, "refused_failed_connects");
    }
    // Checked before the key: a full node spends no key store lookup on a client it
    // cannot take.
    let Some(permit) = app.admission.connect() else {
        if let Some(suppressed) = may_log(&app, peer) {
            tracing::warn!(
                max_connections = app.config.mqtt.max_connections,
                suppressed,
                "connection refused: the node is full"
            );
        }
        let _ = conn
            .send_now(connack(ConnectReturnCode::ServiceUnavailable))
            .await;
        return count_connect(&app, "refused_node_full");
    };
    // Before the login: a revocation of its key from here on closes it as it registers.
    let ticket = app.auth.ticket();
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
        Err(Refused { refusal, event }) => {
            if let Some((named, error)) = &event {
                fail(named, error);
            }
            if refusal.counts_as_failed_login() && app.limits.login_failed(peer).await {
                tracing::info!(
                    cooldown = ?app.config.limits.failed_connect_cooldown,
                    "too many failed logins from this address: refused for the cool-down"
                );
            }
            if let Some(suppressed) = may_log(&app, peer) {
                tracing::info!(
                    reason = %Bounded::message(&refusal.to_string()),
                    username = ?connect.login.as_ref().map(|l| Bounded::id(&l.username)),
                    client_id = %Bounded::id(&connect.client_id),
                    suppressed,
                    "connection refused"
                );
            }
            let _ = conn.send_now(connack(refusal.code())).await;
            return count_connect(&app, refusal.outcome());
        }
    };
    if !app.limits.allow_connect(&accepted.key.id) {
        fail(&accepted.app, "connect rate limit exceeded");
        tracing::info!(key_id = %accepted.key.id, "CONNECT refused: over limits.connects_per_key");
        let _ = conn
            .send_now(connack(ConnectReturnCode::ServiceUnavailable))
            .await;
        return count_connect(&app, "refused_rate_limited");
    }
    let quota = app
        .limits
        .quotas
        .acquire(&accepted.app, &accepted.key.id)
        .await;
    if let Quota::Full(scope) = quota {
        fail(
            &accepted.app,
            &format!("connection quota exceeded (per {})", scope.as_str()),
        );
        // CONNACK 3, as The Things Stack answers a resource limit (ResourceExhausted).
        tracing::info!(
            scope = scope.as_str(),
            "CONNECT refused: connection quota of the {} is full",
            scope.as_str()
        );
        let _ = conn
            .send_now(connack(ConnectReturnCode::ServiceUnavailable))
            .await;
        return count_connect(&app, "refused_quota");
    }
    let persistent = match open_session(&app, &accepted, connect.clean_session).await {
        Ok(persistent) => persistent,
        Err(e) => {
            // The client asked for a session we cannot give now: refuse with CONNACK 3, so
            // that it retries rather than believe it has one (a tenant at its session limit
            // is refused like one at a connection quota: ResourceExhausted in The Things
            // Stack).
            let (error, outcome) = match e {
                SessionError::Full => (
                    "persistent session limit of the tenant reached",
                    "refused_sessions_full",
                ),
                _ => ("session store unavailable", "refused_session_unavailable"),
            };
            tracing::warn!(error = %e, "CONNECT refused: no persistent session");
            fail(&accepted.app, error);
            if quota == Quota::Held {
                app.limits
                    .quotas
                    .release(&accepted.app, &accepted.key.id)
                    .await;
            }
            let _ = conn
                .send_now(connack(ConnectReturnCode::ServiceUnavailable))
                .await;
            return count_connect(&app, outcome);
        }
    };
    let span = tracing::Span::current();
    span.record("tenant", field::display(&accepted.app.tenant));
    span.record("app", field::display(&accepted.app.app));
    span.record(
        "client_id",
        field::display(Bounded::id(&accepted.client_id)),
    );
    count_connect::<()>(&app, "accepted");
    // A will on a topic the key may not write is not kept, and the CONNECT is accepted, as
    // The Things Stack does (Home Assistant sets a status will by default).
    let will = connect.last_will.filter(|will| {
        let target = write_target(
            &app.tenancy,
            &accepted.app,
            accepted.key.rights,
            &will.topic,
        );
        match target {
            Target::Downlink(..) => true,
            Target::Refused { reason, .. } => {
                tracing::info!(
                    will_topic = %Bounded::id(&will.topic),
                    reason,
                    "will ignored: the key may not write its topic"
                );
                app.metrics
                    .publishes_refused
                    .get_or_create(&ReasonLabels {
                        reason: "will_ignored",
                    })
                    .inc();
                false
            }
        }
    });
    let keep_alive = held_keepalive(connect.keep_alive, app.config.mqtt.max_keepalive);
    let epoch = app
        .registry
        .claim_epoch(app.epochs.as_ref(), &accepted.app, &accepted.client_id)
        .await;
    let session = Session::new(
        app,
        accepted,
        (keep_alive, persistent),
        will,
        quota == Quota::Held,
        (epoch, ticket),
        (remote, transport.kind()),
    );
    Some((session, conn, permit))
}

/// The persistent session of a `clean_session=0` CONNECT, resumed or created, when
/// `sessions.enabled`; `None` for a clean session, whose stored session (if any) is
/// discarded first, as MQTT 3.1.1 §3.1.2.4 says.
async fn open_session(
    app: &Arc<App>,
    accepted: &super::connect::Accepted,
    clean_session: bool,
) -> Result<Option<crate::sessions::Opened>, SessionError> {
    if !app.config.sessions.enabled {
        return Ok(None);
    }
    let key = crate::sessions::SessionKey {
        app: accepted.app.clone(),
        client_id: accepted.client_id.clone(),
    };
    if clean_session {
        // Before the CONNACK, not in the background: a client that connects clean to
        // reset its session and then at once with clean_session=0 must get a new session,
        // not one that a late discard deletes under it. A store that cannot be reached
        // does not refuse the clean connection, which needs nothing from it.
        match app.sessions.discard(&key).await {
            Ok(true) => {
                app.metrics.sessions_discarded.inc();
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not discard the stored session"),
        }
        return Ok(None);
    }
    let opened = app.sessions.open(&key).await;
    let outcome = match &opened {
        Ok(o) if o.present => "resumed",
        Ok(_) => "created",
        Err(SessionError::Full) => "full",
        Err(_) => "unavailable",
    };
    app.metrics
        .sessions_opened
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    opened.map(Some)
}

/// Emits `as.mqtt.connect.fail` for `app`: `connect` was refused for `error`.
fn connect_failed(
    app: &App,
    app_ref: &AppRef,
    connect: &mqttbytes::v4::Connect,
    remote: SocketAddr,
    transport: Kind,
    error: &str,
) {
    app.events.emit(
        app_ref,
        names::CONNECT_FAIL,
        data([
            ("client_id", bounded(&connect.client_id)),
            ("remote_addr", remote.to_string().into()),
            ("transport", transport.as_str().into()),
            ("error", bounded(error)),
        ]),
    );
}

/// Whether a refusal from `peer` may be logged now (see [`crate::log::LogLimiter`]):
/// `Some(lines held back before it)`, or `None` (counted).
fn may_log(app: &App, peer: IpAddr) -> Option<u64> {
    match app.refusal_log.check(peer) {
        Verdict::Log { suppressed } => Some(suppressed),
        Verdict::Suppress => {
            app.metrics.log_lines_suppressed.inc();
            None
        }
    }
}

/// The keepalive a client asking `requested` seconds is held to: 0 (none) and anything
/// above `max` become `max` (as The Things Stack does), so that no connection lives
/// forever without a packet.
pub(super) fn held_keepalive(requested: u16, max: Duration) -> Duration {
    let requested = Duration::from_secs(u64::from(requested));
    if requested.is_zero() || requested > max {
        max
    } else {
        requested
    }
}

/// Counts a CONNECT outcome; `None`, for the handshake to return.
fn count_connect<T>(app: &App, outcome: &'static str) -> Option<T> {
    app.metrics
        .connects
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    None
}

/// Counts a packet that closed its connection as malformed (or too large).
pub(super) fn count_malformed(app: &App, e: &DecodeError) {
    app.metrics
        .malformed_packets
        .get_or_create(&ReasonLabels { reason: e.reason() })
        .inc();
}

/// An encoded CONNACK with `code`, session present 0.
pub(super) fn connack(code: ConnectReturnCode) -> Bytes {
    connack_present(code, false)
}

/// An encoded CONNACK with `code` and the session-present flag.
pub(super) fn connack_present(code: ConnectReturnCode, present: bool) -> Bytes {
    encode(&Packet::ConnAck(ConnAck::new(code, present)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_zero_and_over_the_max_are_held_to_the_max() {
        let max = Duration::from_secs(3600);
        assert_eq!(held_keepalive(0, max), max);
        assert_eq!(held_keepalive(60, max), Duration::from_secs(60));
        assert_eq!(held_keepalive(3600, max), max);
        assert_eq!(held_keepalive(u16::MAX, max), max);
    }
}
