//! One live event, shaped like The Things Stack's events (`ttnpb.Event` as its API writes
//! it): `name`, `time` (RFC 3339 with nanoseconds), `identifiers`
//! (`[{"application_ids":{"application_id":"app1"}}]`), `data`, `origin` (the node name)
//! and `unique_id` (a ULID). lorabroker adds the tenant to `data` as `tenant_id`.
//!
//! Everything a client chose (client IDs, topics, filters) is cut to [`MAX_FIELD_CHARS`]
//! before it enters an event.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::topic::AppRef;

/// The longest text a client controls that an event carries (longer is cut, with `…`).
pub const MAX_FIELD_CHARS: usize = 200;

/// The event names lorabroker publishes.
pub mod names {
    /// A client connected: client_id, remote_addr, key_id, transport, node.
    pub const CONNECT: &str = "as.mqtt.connect";
    /// A CONNECT naming the application was refused: client_id, remote_addr, transport,
    /// error.
    pub const CONNECT_FAIL: &str = "as.mqtt.connect.fail";
    /// A connection ended: client_id, remote_addr, key_id, reason.
    pub const DISCONNECT: &str = "as.mqtt.disconnect";
    /// A subscription filter was refused: client_id, filter, reason.
    pub const SUBSCRIBE_FAIL: &str = "as.mqtt.subscribe.fail";
    /// A PUBLISH was refused: client_id, topic, reason.
    pub const PUBLISH_FAIL: &str = "as.mqtt.publish.fail";
    /// A downlink was queued: device_id, summary.
    pub const DOWN_QUEUED: &str = "as.down.queued";
    /// A downlink failed: device_id, summary.
    pub const DOWN_FAILED: &str = "as.down.failed";
    /// A sampled uplink (at most `events.uplink_sample_per_second` per application and
    /// stream node): device_id, size.
    pub const UP_SAMPLE: &str = "as.up.sample";
}

/// The NATS subject of `app`'s events: `lorabroker.events.{tenant}.{app}`.
pub fn subject(app: &AppRef) -> String {
    format!("lorabroker.events.{}.{}", app.tenant, app.app)
}

/// `application_ids` of The Things Stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationIds {
    /// The application ID (without the tenant).
    pub application_id: String,
}

/// One entry of `identifiers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifiers {
    /// The application the event is about.
    pub application_ids: ApplicationIds,
}

/// A live event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `as.mqtt.connect`, … (see [`names`]).
    pub name: String,
    /// When it happened, RFC 3339 with nanoseconds, UTC.
    pub time: String,
    /// The application, as The Things Stack writes it.
    pub identifiers: Vec<Identifiers>,
    /// What happened; always carries `tenant_id`.
    pub data: Map<String, Value>,
    /// The node name (`node_name`) of the node it happened on.
    pub origin: String,
    /// A ULID, unique per event.
    pub unique_id: String,
}

impl Event {
    /// An event of `app` named `name`, happening now on `origin`, with `data` (to which
    /// `tenant_id` is added).
    pub fn new(name: &str, app: &AppRef, origin: &str, mut data: Map<String, Value>) -> Self {
        data.insert("tenant_id".into(), Value::String(app.tenant.to_string()));
        Self {
            name: name.to_owned(),
            time: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            identifiers: vec![Identifiers {
                application_ids: ApplicationIds {
                    application_id: app.app.to_string(),
                },
            }],
            data,
            origin: origin.to_owned(),
            unique_id: ulid::Ulid::new().to_string(),
        }
    }

    /// The event as one line of JSON (no newline can occur in it: serde_json escapes
    /// them in strings), as published and as sent in an SSE `data:` line.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether `name` is an event name as lorabroker writes them: lowercase words and dots,
    /// at most 64 characters (what the SSE `event:` line may carry).
    pub fn is_valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
    }
}

/// `text` cut to [`MAX_FIELD_CHARS`] characters (with `…` when cut).
pub fn bounded(text: &str) -> Value {
    match text.char_indices().nth(MAX_FIELD_CHARS) {
        None => Value::String(text.to_owned()),
        Some((at, _)) => Value::String(format!("{}…", &text[..at])),
    }
}

/// Builds the `data` of an event from `(field, value)` pairs.
pub fn data<const N: usize>(fields: [(&str, Value); N]) -> Map<String, Value> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    #[test]
    fn the_json_is_shaped_like_the_things_stacks_events() {
        let e = Event::new(
            names::CONNECT_FAIL,
            &app(),
            "node-1",
            data([
                ("client_id", bounded("c1")),
                ("error", "api key with id ABC not found".into()),
            ]),
        );
        let json: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(json["name"], "as.mqtt.connect.fail");
        assert_eq!(
            json["identifiers"],
            serde_json::json!([{"application_ids": {"application_id": "app1"}}])
        );
        assert_eq!(json["data"]["tenant_id"], "tenant1");
        assert_eq!(json["data"]["error"], "api key with id ABC not found");
        assert_eq!(json["origin"], "node-1");
        assert_eq!(json["unique_id"].as_str().unwrap().len(), 26, "a ULID");
        let time = json["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        let fraction = time.split('.').nth(1).unwrap();
        assert_eq!(fraction.len(), "123456789Z".len(), "nanoseconds: {time}");
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            ["name", "time", "identifiers", "data", "origin", "unique_id"]
        );
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn client_text_is_bounded_and_json_stays_on_one_line() {
        let long = "é".repeat(10_000);
        let Value::String(cut) = bounded(&long) else {
            panic!()
        };
        assert_eq!(cut.chars().count(), MAX_FIELD_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short"), Value::String("short".into()));
        let e = Event::new(
            names::PUBLISH_FAIL,
            &app(),
            "n",
            data([("topic", bounded("a\nb\r\nc"))]),
        );
        assert!(!e.to_json().contains(&b'\n'));
    }

    #[test]
    fn names() {
        assert!(Event::is_valid_name("as.mqtt.connect.fail"));
        assert!(!Event::is_valid_name("as.mqtt\nevent: x"));
        assert!(!Event::is_valid_name(""));
        assert!(!Event::is_valid_name(&"a".repeat(65)));
        assert_eq!(subject(&app()), "lorabroker.events.tenant1.app1");
    }
}
