//! What travels on a device's topics: the server → client traffic [`Event`]s of DESIGN §4
//! (and [`EventSet`]s of them), and the client → server downlink operations.

use super::{AppRef, DeviceRef, Id, Tenancy};

/// Server → client traffic events, in the order of DESIGN §4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// `join`
    Join,
    /// `up`
    Up,
    /// `up/normalized`
    UpNormalized,
    /// `down/queued`
    DownQueued,
    /// `down/sent`
    DownSent,
    /// `down/ack`
    DownAck,
    /// `down/nack`
    DownNack,
    /// `down/failed`
    DownFailed,
    /// `down/invalidated`
    DownInvalidated,
    /// `service/data`
    ServiceData,
    /// `location/solved`
    LocationSolved,
}

impl Event {
    /// Every event, for tests and tools.
    pub const ALL: [Event; 11] = [
        Event::Join,
        Event::Up,
        Event::UpNormalized,
        Event::DownQueued,
        Event::DownSent,
        Event::DownAck,
        Event::DownNack,
        Event::DownFailed,
        Event::DownInvalidated,
        Event::ServiceData,
        Event::LocationSolved,
    ];

    /// The topic levels after `devices/{dev}/`.
    pub fn topic_suffix(self) -> &'static str {
        match self {
            Event::Join => "join",
            Event::Up => "up",
            Event::UpNormalized => "up/normalized",
            Event::DownQueued => "down/queued",
            Event::DownSent => "down/sent",
            Event::DownAck => "down/ack",
            Event::DownNack => "down/nack",
            Event::DownFailed => "down/failed",
            Event::DownInvalidated => "down/invalidated",
            Event::ServiceData => "service/data",
            Event::LocationSolved => "location/solved",
        }
    }

    /// The subject tokens after `devices.{dev}.`.
    pub fn subject_suffix(self) -> &'static str {
        match self {
            Event::Join => "join",
            Event::Up => "up",
            Event::UpNormalized => "up.normalized",
            Event::DownQueued => "down.queued",
            Event::DownSent => "down.sent",
            Event::DownAck => "down.ack",
            Event::DownNack => "down.nack",
            Event::DownFailed => "down.failed",
            Event::DownInvalidated => "down.invalidated",
            Event::ServiceData => "service.data",
            Event::LocationSolved => "location.solved",
        }
    }

    /// Parses the subject tokens after `devices.{dev}.`.
    pub fn from_subject_suffix(s: &str) -> Option<Self> {
        Event::ALL.into_iter().find(|e| e.subject_suffix() == s)
    }

    /// This event's bit in an [`EventSet`].
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of [`Event`]s, as a bit set: what one filter (or one client's filters) selects
/// of a device's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventSet(u16);

impl EventSet {
    /// No event.
    pub const NONE: EventSet = EventSet(0);
    /// Every event.
    pub const ALL: EventSet = EventSet((1 << Event::ALL.len()) - 1);

    /// Whether `event` is in the set.
    pub fn contains(self, event: Event) -> bool {
        self.0 & event.bit() != 0
    }

    /// Adds `event`.
    pub fn insert(&mut self, event: Event) {
        self.0 |= event.bit();
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The events in either set.
    pub fn union(self, other: EventSet) -> EventSet {
        EventSet(self.0 | other.0)
    }

    /// The events of `self` that are not in `other`.
    pub fn difference(self, other: EventSet) -> EventSet {
        EventSet(self.0 & !other.0)
    }
}

/// Client → server operations on the downlink queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownlinkOp {
    /// `down/push`: append to the queue.
    Push,
    /// `down/replace`: replace the queue.
    Replace,
}

/// Parses a PUBLISH topic into the device and the downlink operation it names, if the topic
/// is one of `app`'s writable topics (`v3/{app}/devices/{dev}/down/push|replace`).
pub fn parse_downlink_topic(
    tenancy: &Tenancy,
    app: &AppRef,
    topic: &str,
) -> Option<(DeviceRef, DownlinkOp)> {
    let rest = topic.strip_prefix("v3/")?;
    let rest = rest.strip_prefix(tenancy.app_uid(app).as_str())?;
    let rest = rest.strip_prefix("/devices/")?;
    let (device, op) = rest.split_once('/')?;
    let op = match op {
        "down/push" => DownlinkOp::Push,
        "down/replace" => DownlinkOp::Replace,
        _ => return None,
    };
    let device = Id::parse(device).ok()?;
    Some((DeviceRef::new(app.clone(), device), op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn app() -> AppRef {
        AppRef::new(id("tenant1"), id("app1"))
    }

    #[test]
    fn downlink_topics() {
        let t = Tenancy::Multi;
        let (dev, op) =
            parse_downlink_topic(&t, &app(), "v3/app1@tenant1/devices/dev1/down/push").unwrap();
        assert_eq!(dev.device.as_str(), "dev1");
        assert_eq!(op, DownlinkOp::Push);
        let (_, op) =
            parse_downlink_topic(&t, &app(), "v3/app1@tenant1/devices/dev1/down/replace").unwrap();
        assert_eq!(op, DownlinkOp::Replace);
        for bad in [
            "v3/app2@tenant1/devices/dev1/down/push",
            "v3/app1@tenant2/devices/dev1/down/push",
            "v3/app1/devices/dev1/down/push",
            "v3/app1@tenant1/devices/dev1/up",
            "v3/app1@tenant1/devices/DEV/down/push",
            "v3/app1@tenant1/devices/dev1/down/push/x",
            "v3/app1@tenant1/devices/+/down/push",
            "v3/app1@tenant1x/devices/dev1/down/push",
        ] {
            assert!(parse_downlink_topic(&t, &app(), bad).is_none(), "{bad}");
        }
    }
}
