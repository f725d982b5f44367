//! The CONNECT phase of a connection: read the CONNECT within the connect timeout, answer
//! what cannot go on (another protocol version gets CONNACK 0x01, MQTT-3.1.2-2; a refusal
//! gets its code), decide the will, and hand an accepted client to its [`Session`].
//!
//! Packets the client sent behind the CONNECT stay in the [`Wire`]'s buffer for the
//! session, which handles them right after queueing the CONNACK (§3.1.4 lets a client
//! send before it sees the CONNACK).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::field;

use super::codec::{encode, DecodeError};
use super::connect::accept;
use super::publish::{bounded, write_target, Target};
use super::session::Session;
use super::wire::{ReadError, Wire};
use crate::app::App;
use crate::limits::Admission;
use crate::metrics::{OutcomeLabels, ReasonLabels};

/// Reads and decides the CONNECT; `None` when the connection ends here (refused,
/// timed out, closed).
pub(super) async fn handshake(
    app: Arc<App>,
    stream: TcpStream,
    peer: IpAddr,
) -> Option<(Session, Wire)> {
    let _ = stream.set_nodelay(true);
    let mut conn = Wire::new(stream, app.config.mqtt.max_packet_size);
    let connect_timeout = app.config.mqtt.connect_timeout;
    let connect = match timeout(connect_timeout, conn.read_connect()).await {
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
            tracing::debug!(%what, "CONNECT refused: unsupported protocol version");
            let _ = conn
                .send_now(connack(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            // MQTT-3.1.2-2: CONNACK 0x01, then close (with a FIN, so the CONNACK is read).
            conn.shutdown().await;
            return count_connect(&app, "refused_protocol");
        }
        Ok(Err(ReadError::Decode(e))) => {
            tracing::debug!(error = %e, "malformed CONNECT");
            count_malformed(&app, &e);
            return count_connect(&app, "protocol_error");
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "unreadable CONNECT");
            return count_connect(&app, "protocol_error");
        }
    };
    if app.limits.is_banned(peer).await {
        // Over limits.failed_connects_per_ip: refused for the cool-down with the code a bad
        // key gets, without asking the key store (counted by the limits).
        tracing::debug!("CONNECT refused: too many failed logins from this address");
        let _ = conn
            .send_now(connack(ConnectReturnCode::NotAuthorized))
            .await;
        return count_connect(&app, "refused_failed_connects");
    }
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
            if refusal.counts_as_failed_login() && app.limits.login_failed(peer).await {
                tracing::info!(
                    cooldown = ?app.config.limits.failed_connect_cooldown,
                    "too many failed logins from this address: refused for the cool-down"
                );
            }
            tracing::info!(reason = %refusal, "connection refused");
            let _ = conn.send_now(connack(refusal.code())).await;
            return count_connect(&app, refusal.outcome());
        }
    };
    if !app.limits.allow_connect(&accepted.key.id) {
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
    if let Admission::Full(scope) = quota {
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
    let span = tracing::Span::current();
    span.record("tenant", field::display(&accepted.app.tenant));
    span.record("app", field::display(&accepted.app.app));
    span.record("client_id", field::display(&accepted.client_id));
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
                    will_topic = bounded(&will.topic),
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
    let session = Session::new(app, accepted, keep_alive, will, quota == Admission::Held);
    Some((session, conn))
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

/// An encoded CONNACK with `code` (session present 0: every session is clean).
pub(super) fn connack(code: ConnectReturnCode) -> Bytes {
    encode(&Packet::ConnAck(ConnAck::new(code, false)))
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
