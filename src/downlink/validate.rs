//! Validation of `down/push` and `down/replace` bodies (DESIGN §5).
//!
//! A body is `{"downlinks":[…]}` where each item is a subset of The Things Stack's
//! `ApplicationDownlink`. Items are checked field by field with typed serde structs, then
//! kept as the client wrote them: validation never rewrites what the application sent.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::DownlinkError;

/// Highest application `f_port` a downlink may use.
pub const MAX_F_PORT: i64 = 233;
/// Largest decoded `frm_payload`, in bytes.
pub const MAX_FRM_PAYLOAD: usize = 250;
/// Longest correlation ID, in characters.
pub const MAX_CORRELATION_ID_LEN: usize = 100;

/// The request envelope.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    downlinks: Vec<Value>,
}

/// Downlink priority names of The Things Stack.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    /// The default.
    Lowest,
    /// Low.
    Low,
    /// Below normal.
    BelowNormal,
    /// Normal.
    Normal,
    /// Above normal.
    AboveNormal,
    /// High.
    High,
    /// Highest.
    Highest,
}

/// The fields of one item a client may send; anything else is rejected by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields are read by serde's type checks; the item is kept as JSON
struct ApplicationDownlink {
    f_port: i64,
    #[serde(default)]
    frm_payload: Option<String>,
    #[serde(default)]
    decoded_payload: Option<Map<String, Value>>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    confirmed: Option<bool>,
    #[serde(default)]
    correlation_ids: Option<Vec<String>>,
    #[serde(default)]
    class_b_c: Option<ClassBC>,
    #[serde(default)]
    session_key_id: Option<String>,
    #[serde(default)]
    f_cnt: Option<u32>,
    #[serde(default)]
    confirmed_retry: Option<Map<String, Value>>,
    #[serde(default)]
    decoded_payload_warnings: Option<Vec<String>>,
}

/// Class B/C scheduling hints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ClassBC {
    #[serde(default)]
    gateways: Option<Vec<Value>>,
    #[serde(default)]
    absolute_time: Option<String>,
}

/// Parses and validates a request body into its items, in order. The first problem found
/// is returned, naming the item index, the field and the value.
pub fn parse_request(body: &[u8]) -> Result<Vec<Map<String, Value>>, DownlinkError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| DownlinkError::NotJson(e.to_string()))?;
    let request: Request = serde_json::from_value(value)
        .map_err(|e| DownlinkError::Invalid(format!("downlink request: {e}")))?;
    request
        .downlinks
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            validate_item(item)
                .map_err(|problem| DownlinkError::Invalid(format!("downlinks[{i}]: {problem}")))
        })
        .collect()
}

/// Checks one item and returns it unchanged; the error names the field and the value.
fn validate_item(item: Value) -> Result<Map<String, Value>, String> {
    let d = ApplicationDownlink::deserialize(&item).map_err(|e| e.to_string())?;
    if !(1..=MAX_F_PORT).contains(&d.f_port) {
        return Err(format!("f_port {} out of range 1..={MAX_F_PORT}", d.f_port));
    }
    if let Some(payload) = &d.frm_payload {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|e| format!("frm_payload is not valid base64: {e}"))?;
        if bytes.len() > MAX_FRM_PAYLOAD {
            return Err(format!(
                "frm_payload of {} bytes exceeds {MAX_FRM_PAYLOAD} bytes",
                bytes.len()
            ));
        }
    }
    for id in d.correlation_ids.iter().flatten() {
        if id.chars().count() > MAX_CORRELATION_ID_LEN {
            return Err(format!(
                "correlation ID {id:?} is longer than {MAX_CORRELATION_ID_LEN} characters"
            ));
        }
    }
    if let Some(key) = &d.session_key_id {
        base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|e| format!("session_key_id is not valid base64: {e}"))?;
    }
    match item {
        Value::Object(map) => Ok(map),
        other => Err(format!("expected an object, found {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn err(body: &str) -> String {
        parse_request(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn seed_examples_are_valid() {
        let items = parse_request(
            br#"{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL"}]}"#,
        )
        .unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["frm_payload"], "vu8=");
        let items = parse_request(
            br#"{"downlinks":[{"f_port":15,"decoded_payload":{"bytes":[1,2]},"confirmed":true,
                "correlation_ids":["my-correlation-id"],"class_b_c":{"absolute_time":"2026-01-01T00:00:00Z"},
                "session_key_id":"AWnj0318qrtJ7kbudd8Vmw==","f_cnt":11,"decoded_payload_warnings":[]}]}"#,
        )
        .unwrap();
        assert_eq!(items[0]["confirmed"], true);
        assert!(parse_request(br#"{"downlinks":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn every_problem_is_named() {
        assert!(err("not json").contains("not valid JSON"));
        assert!(err(r#"{"downlinks":[{"f_port":1,"fport":2}]}"#).contains("`fport`"));
        assert!(err(r#"{"downlinks":[{"f_port":0}]}"#).contains("f_port 0 out of range"));
        assert!(err(r#"{"downlinks":[{"f_port":234}]}"#).contains("f_port 234"));
        assert!(err(r#"{"downlinks":[{"frm_payload":"AA=="}]}"#).contains("f_port"));
        assert!(err(r#"{"downlinks":[{"f_port":1,"frm_payload":"!!"}]}"#).contains("base64"));
        assert!(err(r#"{"downlinks":[{"f_port":1,"priority":"URGENT"}]}"#).contains("URGENT"));
        assert!(err(r#"{"downlinks":[{"f_port":1}],"extra":1}"#).contains("`extra`"));
        assert!(err(r#"{"downlinks":[1]}"#).contains("downlinks[0]"));
        assert!(err(r#"{}"#).contains("downlinks"));
        let big = base64::engine::general_purpose::STANDARD.encode([0u8; 251]);
        assert!(
            err(&json!({"downlinks":[{"f_port":1,"frm_payload":big}]}).to_string())
                .contains("251 bytes")
        );
        let long = "x".repeat(101);
        assert!(
            err(&json!({"downlinks":[{"f_port":1,"correlation_ids":[long]}]}).to_string())
                .contains("longer than 100")
        );
        assert!(err(r#"{"downlinks":[{"f_port":1},{"f_port":300}]}"#).contains("downlinks[1]"));
    }

    #[test]
    fn limits_are_inclusive() {
        let max = base64::engine::general_purpose::STANDARD.encode([7u8; 250]);
        let body = json!({"downlinks":[{"f_port":233,"frm_payload":max},{"f_port":1}]});
        assert_eq!(parse_request(body.to_string().as_bytes()).unwrap().len(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&body);
        }

        #[test]
        fn f_port_range_is_exact(port in -1000i64..1000) {
            let body = json!({"downlinks":[{"f_port":port}]}).to_string();
            prop_assert_eq!(parse_request(body.as_bytes()).is_ok(), (1..=233).contains(&port));
        }
    }
}
