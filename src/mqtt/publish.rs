//! Inbound PUBLISH on an established connection (DESIGN §4): what its topic allows, the
//! downlink it carries, and when it is acknowledged.
//!
//! - A topic the client may not write is acknowledged as usual and dropped, counted
//!   (`lorabroker_publishes_refused_total{reason}`) and logged at a falling rate; when it
//!   names a valid device of the client's own application, one `down/failed` says why.
//!   Closing instead would make client libraries reconnect and resend it forever.
//! - A downlink is acknowledged (PUBACK, PUBREC) once the queue stored it, or once
//!   validation rejected it for good (with its `down/failed`). When the queue backend is
//!   unavailable a QoS 1/2 publish is not acknowledged and the connection closes, so that
//!   the client retransmits after reconnecting.
//! - QoS 2 is exactly-once per connection: a packet ID is held from PUBREC to PUBREL, and
//!   a PUBLISH repeating a held ID is acknowledged again but not processed again
//!   (MQTT-4.3.3-2). At most `mqtt.max_inflight_qos2` IDs are held.

use mqttbytes::v4::{Packet, PubAck, PubComp, PubRec, Publish};
use mqttbytes::QoS;

use super::codec::encode;
use super::session::{End, Session};
use crate::auth::Rights;
use crate::downlink::DownlinkError;
use crate::events::{bounded as field, names};
use crate::limits::DownlinkVerdict;
use crate::log::Bounded;
use crate::metrics::{DownlinkLabels, ReasonLabels};
use crate::topic::{parse_downlink_topic, AppRef, DeviceRef, DownlinkOp, Id, Tenancy};

/// Longest client-written text (a topic, part of one) put in a log line or an error.
const MAX_QUOTED: usize = 128;

/// What a PUBLISH topic is for a client.
#[derive(Debug, PartialEq)]
pub(super) enum Target {
    /// A downlink operation on one of its application's devices, which the key may do.
    Downlink(DeviceRef, DownlinkOp),
    /// Anything else. `failed` is the device and error of the `down/failed` to publish,
    /// when the topic names a valid device of the client's own application.
    Refused {
        /// The `reason` label of the refusal.
        reason: &'static str,
        /// The `down/failed` that explains it, if there is a device to tell.
        failed: Option<(DeviceRef, DownlinkError)>,
    },
}

/// Decides what a PUBLISH (or a will) on `topic` is for a client of `app` with `rights`.
pub(super) fn write_target(tenancy: &Tenancy, app: &AppRef, rights: Rights, topic: &str) -> Target {
    if let Some((device, op)) = parse_downlink_topic(tenancy, app, topic) {
        if rights.can_write_down() {
            return Target::Downlink(device, op);
        }
        return Target::Refused {
            reason: "no_down_write_right",
            failed: Some((device, DownlinkError::NoDownWriteRight)),
        };
    }
    let uid = tenancy.app_uid(app);
    let Some(rest) = topic
        .strip_prefix("v3/")
        .and_then(|t| t.strip_prefix(uid.as_str()))
        .and_then(|t| t.strip_prefix("/devices/"))
    else {
        return Target::Refused {
            reason: "not_an_application_topic",
            failed: None,
        };
    };
    let (device, event) = rest.split_once('/').unwrap_or((rest, ""));
    match Id::parse(device) {
        Ok(device) => Target::Refused {
            reason: "topic_not_writable",
            failed: Some((
                DeviceRef::new(app.clone(), device),
                DownlinkError::TopicNotWritable(bounded(event).to_owned()),
            )),
        },
        Err(_) => Target::Refused {
            reason: "invalid_device_id",
            failed: None,
        },
    }
}

/// `s` cut to at most [`MAX_QUOTED`] bytes at a character boundary: client input in logs
/// and errors stays bounded.
pub(super) fn bounded(s: &str) -> &str {
    let mut end = s.len().min(MAX_QUOTED);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How a downlink operation reads in an event summary.
fn op_verb(op: DownlinkOp) -> &'static str {
    match op {
        DownlinkOp::Push => "pushed",
        DownlinkOp::Replace => "replaced",
    }
}

/// Whether the `n`th refused publish of a connection is logged at INFO: the 1st, 2nd,
/// 4th, 8th… so that a client looping on a forbidden topic writes a few lines, not one
/// per packet (the others are logged at DEBUG).
fn logs_refusal(n: u32) -> bool {
    n.is_power_of_two()
}

/// The QoS 2 packet IDs a connection holds between PUBREC and PUBREL. Nothing is
/// allocated on a connection that does not use QoS 2, and the allocation is freed when
/// the last ID is released.
#[derive(Default)]
pub(super) struct Qos2Ids(
    // Boxed: one pointer in every connection's future rather than a whole `Vec`.
    #[allow(clippy::box_collection)] Option<Box<Vec<u16>>>,
);

impl Qos2Ids {
    fn contains(&self, pkid: u16) -> bool {
        self.0.as_ref().is_some_and(|ids| ids.contains(&pkid))
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |ids| ids.len())
    }

    fn insert(&mut self, pkid: u16) {
        let ids = self.0.get_or_insert_with(Box::default);
        if !ids.contains(&pkid) {
            ids.push(pkid);
        }
    }

    fn release(&mut self, pkid: u16) {
        if let Some(ids) = &mut self.0 {
            ids.retain(|&p| p != pkid);
            if ids.is_empty() {
                self.0 = None;
            }
        }
    }
}

impl Session {
    /// Handles one inbound PUBLISH; `Some` ends the session.
    pub(super) async fn handle_publish(&mut self, publish: Publish) -> Option<End> {
        if let Some(counters) = self.app.stats.of(&self.registration.app) {
            counters.received();
        }
        let pkid = publish.pkid;
        if publish.qos == QoS::ExactlyOnce {
            if self.qos2.contains(pkid) {
                // A retransmission (DUP or not) of a message already handled.
                tracing::debug!(
                    pkid,
                    "duplicate QoS 2 PUBLISH acknowledged again, not processed"
                );
                self.out.push(encode(&Packet::PubRec(PubRec::new(pkid))));
                return None;
            }
            let max = self.app.config.mqtt.max_inflight_qos2;
            if self.qos2.len() >= max {
                return Some(End::Qos2InflightExceeded(max));
            }
        }
        let target = write_target(
            &self.app.tenancy,
            &self.registration.app,
            self.key.rights,
            &publish.topic,
        );
        match target {
            Target::Downlink(device, op) => {
                let verdict = self
                    .app
                    .limits
                    .downlink(&self.registration.app, &self.key.id);
                if let DownlinkVerdict::Limited { limit, report } = verdict {
                    if let Some(end) = self.rate_limit(&device, limit, report).await {
                        return Some(end);
                    }
                    return self.acknowledge(publish.qos, pkid);
                }
                self.rate_limited = self.rate_limited.saturating_sub(1);
                let result = self.publish_downlink(&device, op, &publish.payload).await;
                if let Err(e) = result {
                    // QoS 0 has nothing to retransmit: its `down/failed` is all there is.
                    if e.retry_helps() && publish.qos != QoS::AtMostOnce {
                        return Some(End::QueueUnavailable);
                    }
                }
            }
            Target::Refused { reason, failed } => {
                self.refuse(&publish.topic, reason, failed).await;
            }
        }
        self.acknowledge(publish.qos, pkid)
    }

    /// Acknowledges a handled PUBLISH as its QoS asks; never ends the session.
    fn acknowledge(&mut self, qos: QoS, pkid: u16) -> Option<End> {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.out.push(encode(&Packet::PubAck(PubAck::new(pkid)))),
            QoS::ExactlyOnce => {
                self.qos2.insert(pkid);
                self.out.push(encode(&Packet::PubRec(PubRec::new(pkid))));
            }
        }
        None
    }

    /// A downlink dropped by a rate limit: acknowledged like any refused publish, one
    /// `down/failed` `rate_limited` when `report` (the reports have their own rate), and
    /// `Some` end once the client has kept going past `limits.downlink_disconnect_after`.
    async fn rate_limit(
        &mut self,
        device: &DeviceRef,
        limit: &'static str,
        report: bool,
    ) -> Option<End> {
        self.rate_limited = self.rate_limited.saturating_add(1);
        self.event(
            names::PUBLISH_FAIL,
            [
                ("device_id", device.device.to_string().into()),
                ("reason", "rate_limited".into()),
                ("limit", limit.into()),
            ],
        );
        let after = self.app.config.limits.downlink_disconnect_after;
        if after > 0 && self.rate_limited >= after {
            return Some(End::RateLimited(limit));
        }
        if logs_refusal(self.rate_limited) {
            tracing::info!(
                limit,
                rate_limited_on_this_connection = self.rate_limited,
                "downlink dropped: over a rate limit"
            );
        }
        if report {
            let error = DownlinkError::RateLimited(limit);
            self.app.downlinks.report_refused(device, error).await;
        }
        None
    }

    /// PUBREL: the client will not send that QoS 2 message again; release its ID.
    /// PUBCOMP answers an unknown ID too (MQTT-4.3.3: the receiver "MUST respond to a
    /// PUBREL packet by sending a PUBCOMP packet containing the same Packet Identifier").
    pub(super) fn handle_pubrel(&mut self, pkid: u16) {
        self.qos2.release(pkid);
        self.out.push(encode(&Packet::PubComp(PubComp::new(pkid))));
    }

    /// Counts and logs a refused publish, and tells the device's subscribers why.
    async fn refuse(
        &mut self,
        topic: &str,
        reason: &'static str,
        failed: Option<(DeviceRef, DownlinkError)>,
    ) {
        self.app
            .metrics
            .publishes_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.refused = self.refused.saturating_add(1);
        self.event(
            names::PUBLISH_FAIL,
            [("topic", field(topic)), ("reason", reason.into())],
        );
        if logs_refusal(self.refused) {
            tracing::info!(
                topic = %Bounded::id(topic),
                reason,
                refused_on_this_connection = self.refused,
                "PUBLISH acknowledged and dropped: the key may not write this topic"
            );
        } else {
            tracing::debug!(topic = %Bounded::id(topic), reason, "PUBLISH dropped");
        }
        if let Some((device, error)) = failed {
            self.app.downlinks.report_refused(&device, error).await;
        }
    }

    fn down_event(&self, name: &str, device: &DeviceRef, summary: &str) {
        self.event(
            name,
            [
                ("device_id", device.device.to_string().into()),
                ("summary", field(summary)),
            ],
        );
    }

    /// Hands a downlink publish (or the will) to the downlink service. Failures are
    /// reported to the application by the service as `down/failed` events.
    pub(super) async fn publish_downlink(
        &self,
        device: &DeviceRef,
        op: DownlinkOp,
        payload: &[u8],
    ) -> Result<usize, DownlinkError> {
        let result = self.app.downlinks.handle(device, op, payload).await;
        let outcome = match &result {
            Ok(n) => {
                tracing::debug!(device = %device.device, ?op, items = n, "downlinks queued");
                let summary = format!("{n} downlink(s) {}", op_verb(op));
                self.down_event(names::DOWN_QUEUED, device, &summary);
                "queued"
            }
            Err(e) => {
                tracing::info!(device = %device.device, ?op, error = %Bounded::message(&e.to_string()), "downlink rejected");
                self.down_event(names::DOWN_FAILED, device, &format!("{}: {e}", e.name()));
                e.name()
            }
        };
        self.app
            .metrics
            .downlinks
            .get_or_create(&DownlinkLabels {
                tenant: self.registration.app.tenant.to_string(),
                application: self.registration.app.app.to_string(),
                outcome,
            })
            .inc();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    fn reason(target: &Target) -> (&'static str, Option<&str>) {
        match target {
            Target::Downlink(..) => ("downlink", None),
            Target::Refused { reason, failed } => (reason, failed.as_ref().map(|(_, e)| e.name())),
        }
    }

    #[test]
    fn what_each_topic_is_for_a_client() {
        let multi = Tenancy::Multi;
        let all = Rights::DEFAULT;
        let cases = [
            (
                "v3/app1@tenant1/devices/dev1/down/push",
                all,
                ("downlink", None),
            ),
            (
                "v3/app1@tenant1/devices/dev1/down/replace",
                all,
                ("downlink", None),
            ),
            (
                "v3/app1@tenant1/devices/dev1/down/pushh",
                all,
                ("topic_not_writable", Some("topic_not_writable")),
            ),
            (
                "v3/app1@tenant1/devices/dev1/up",
                all,
                ("topic_not_writable", Some("topic_not_writable")),
            ),
            (
                "v3/app1@tenant1/devices/dev1",
                all,
                ("topic_not_writable", Some("topic_not_writable")),
            ),
            (
                "v3/app1@tenant1/devices/dev1/down/push",
                Rights::TRAFFIC_READ,
                ("no_down_write_right", Some("no_down_write_right")),
            ),
            (
                "v3/app1@tenant1/devices/Dev1/down/push",
                all,
                ("invalid_device_id", None),
            ),
            (
                "v3/app2@tenant1/devices/dev1/down/push",
                all,
                ("not_an_application_topic", None),
            ),
            (
                "v3/app1@tenant2/devices/dev1/down/push",
                all,
                ("not_an_application_topic", None),
            ),
            (
                "v3/app1@tenant1x/devices/dev1/down/push",
                all,
                ("not_an_application_topic", None),
            ),
            (
                "homeassistant/status",
                all,
                ("not_an_application_topic", None),
            ),
        ];
        for (topic, rights, expected) in cases {
            let target = write_target(&multi, &app(), rights, topic);
            assert_eq!(reason(&target), expected, "{topic}");
        }
        let single = Tenancy::Single {
            default_tenant: Id::parse("tenant1").unwrap(),
        };
        assert!(matches!(
            write_target(&single, &app(), all, "v3/app1/devices/dev1/down/push"),
            Target::Downlink(_, DownlinkOp::Push)
        ));
    }

    #[test]
    fn client_text_is_bounded_at_a_character_boundary() {
        assert_eq!(bounded("down/pushh"), "down/pushh");
        let long = "é".repeat(200);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_QUOTED && cut.len() >= MAX_QUOTED - 1);
        let Target::Refused {
            failed: Some((_, DownlinkError::TopicNotWritable(rest))),
            ..
        } = write_target(
            &Tenancy::Multi,
            &app(),
            Rights::DEFAULT,
            &format!("v3/app1@tenant1/devices/dev1/{long}"),
        )
        else {
            panic!("a device topic");
        };
        assert!(rest.len() <= MAX_QUOTED);
    }

    #[test]
    fn refusals_are_logged_at_a_falling_rate() {
        let logged: Vec<u32> = (1..=1000).filter(|&n| logs_refusal(n)).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    }

    #[test]
    fn qos2_ids_are_held_until_released_and_the_buffer_freed() {
        let mut ids = Qos2Ids::default();
        ids.insert(7);
        ids.insert(7);
        ids.insert(9);
        assert!(ids.contains(7) && ids.contains(9));
        assert_eq!(ids.len(), 2);
        ids.release(7);
        assert!(!ids.contains(7));
        ids.release(9);
        assert!(ids.0.is_none(), "an empty set holds no allocation");
        ids.release(1234);
    }
}
