//! The mapping between MQTT topics and NATS subjects (DESIGN §7): subjects of device
//! traffic parsed back into events, and topic syntax turned into subject syntax.

use super::id::is_valid_id;
use super::Event;

/// A device event parsed from a traffic subject of a known application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectEvent<'a> {
    /// The device ID, as written in the subject (validated).
    pub device: &'a str,
    /// The event.
    pub event: Event,
}

/// Parses `devices.{dev}.{event…}` (the part of a traffic subject after
/// [`AppRef::subject_prefix`]); `None` for anything that is not a known device event.
pub fn parse_subject_rest(rest: &str) -> Option<SubjectEvent<'_>> {
    let rest = rest.strip_prefix("devices.")?;
    let (device, event) = rest.split_once('.')?;
    if !is_valid_id(device) {
        return None;
    }
    Some(SubjectEvent {
        device,
        event: Event::from_subject_suffix(event)?,
    })
}

/// Converts an MQTT topic or filter to NATS syntax (`/` → `.`, `+` → `*`, `#` → `>`).
/// Callers only pass topics built from validated IDs.
pub fn topic_to_subject(topic: &str) -> String {
    topic
        .split('/')
        .map(|l| match l {
            "+" => "*",
            "#" => ">",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{AppRef, DeviceRef, Id, Tenancy};

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn app() -> AppRef {
        AppRef::new(id("tenant1"), id("app1"))
    }

    #[test]
    fn subjects_and_topics() {
        let dev = DeviceRef::new(app(), id("dev1"));
        assert_eq!(
            dev.subject(Event::DownQueued),
            "v3.tenant1.app1.devices.dev1.down.queued"
        );
        assert_eq!(
            Tenancy::Multi.topic(&dev, Event::UpNormalized),
            "v3/app1@tenant1/devices/dev1/up/normalized"
        );
        assert_eq!(app().traffic_subject_filter(), "v3.tenant1.app1.>");
        for e in Event::ALL {
            assert_eq!(e.subject_suffix().replace('.', "/"), e.topic_suffix());
            assert_eq!(Event::from_subject_suffix(e.subject_suffix()), Some(e));
            let rest = format!("devices.dev1.{}", e.subject_suffix());
            assert_eq!(
                parse_subject_rest(&rest),
                Some(SubjectEvent {
                    device: "dev1",
                    event: e
                })
            );
        }
        assert_eq!(parse_subject_rest("devices.dev1.down.push"), None);
        assert_eq!(parse_subject_rest("devices.D.up"), None);
        assert_eq!(parse_subject_rest("gateways.gw1.up"), None);
        assert_eq!(
            topic_to_subject("v3/+/devices/#"),
            "v3.*.devices.>".to_string()
        );
    }
}
