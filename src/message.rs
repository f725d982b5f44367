//! The Things Stack's JSON documents (DESIGN §6): the envelope every message shares.
//!
//! Device traffic is forwarded as bytes and never parsed on the hot path; these helpers
//! only build the documents lorabroker itself originates (`down/queued`, `down/failed`)
//! and those of the simulated fleet.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use crate::topic::DeviceRef;

/// `end_device_ids` naming only what the broker knows: device and application IDs.
pub fn end_device_ids(device: &DeviceRef) -> Value {
    json!({
        "device_id": device.device.as_str(),
        "application_ids": { "application_id": device.app.app.as_str() },
    })
}

/// A message document: `end_device_ids`, `correlation_ids`, `received_at` (now) and one
/// event field such as `downlink_queued`.
pub fn document(
    end_device_ids: Value,
    correlation_ids: Vec<String>,
    field: &str,
    body: Value,
) -> Value {
    let mut doc = Map::with_capacity(4);
    doc.insert("end_device_ids".into(), end_device_ids);
    doc.insert("correlation_ids".into(), correlation_ids.into());
    doc.insert("received_at".into(), now_rfc3339().into());
    doc.insert(field.into(), body);
    Value::Object(doc)
}

/// The current time as RFC 3339 with nanoseconds, as The Things Stack writes timestamps.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// The `correlation_ids` array of a JSON object, or nothing.
pub fn correlation_ids(value: &Value) -> Vec<String> {
    value
        .get("correlation_ids")
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{AppRef, Id};

    #[test]
    fn envelope_has_the_shared_fields() {
        let device = DeviceRef::new(
            AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap()),
            Id::parse("dev1").unwrap(),
        );
        let doc = document(
            end_device_ids(&device),
            vec!["as:downlink:1".into()],
            "downlink_queued",
            json!({"f_port": 1}),
        );
        assert_eq!(doc["end_device_ids"]["device_id"], "dev1");
        assert_eq!(
            doc["end_device_ids"]["application_ids"]["application_id"],
            "app1"
        );
        assert_eq!(correlation_ids(&doc), vec!["as:downlink:1"]);
        assert!(humantime::parse_rfc3339(doc["received_at"].as_str().unwrap()).is_ok());
        assert_eq!(doc["downlink_queued"]["f_port"], 1);
    }
}
