//! Validation of `down/push` and `down/replace` bodies (DESIGN §5).
//!
//! A body is `{"downlinks":[…]}` where each item is a subset of The Things Stack's
//! `ApplicationDownlink`. Items are checked field by field with typed serde structs (the
//! error names the field's path), as The Things Stack's `ValidateFields` does, and more
//! strictly where it is silent: every field is bounded, so that a valid item is a few KiB
//! at most. Items are then kept as the client wrote them: validation never rewrites what
//! the application sent.
//!
//! Every item of a request is checked (there are at most
//! [`RequestLimits::max_items`]), so that a rejection can list each item's problem.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::class_b_c::{check_class_b_c, ClassBC};
use super::error::{bounded, quoted, DownlinkError};
use crate::config::DownlinkConfig;

/// Highest application `f_port` a downlink may use.
pub const MAX_F_PORT: i64 = 233;
/// `f_port` of the LoRaWAN test protocol, which applications may not use.
pub const TEST_F_PORT: i64 = 224;
/// Largest decoded `frm_payload`, in bytes.
pub const MAX_FRM_PAYLOAD: usize = 250;
/// Longest correlation ID, in characters (as The Things Stack).
pub const MAX_CORRELATION_ID_LEN: usize = 100;
/// Most correlation IDs on one item. An item copied from a The Things Stack event carries
/// about half a dozen; the server adds one more.
pub const MAX_CORRELATION_IDS: usize = 16;
/// Most `decoded_payload_warnings` on one item.
pub const MAX_WARNINGS: usize = 16;
/// Longest `decoded_payload_warnings` entry, in characters.
pub const MAX_WARNING_LEN: usize = 256;
/// Largest decoded `session_key_id`, in bytes (as The Things Stack).
pub const MAX_SESSION_KEY_ID: usize = 2048;

/// The configurable bounds of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most items in one request.
    pub max_items: usize,
    /// Largest `decoded_payload`, as JSON bytes.
    pub max_decoded_payload_bytes: usize,
}

impl RequestLimits {
    /// The bounds of `[downlink]`.
    pub fn from_config(config: &DownlinkConfig) -> Self {
        Self {
            max_items: config.max_items_per_request,
            max_decoded_payload_bytes: config.max_decoded_payload_bytes,
        }
    }
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self::from_config(&DownlinkConfig::default())
    }
}

/// Why a request was rejected, and what of it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The request's own problem, or else that of its first failing item.
    pub error: DownlinkError,
    /// Each failing item's first problem, by index, in order (empty when the request as a
    /// whole is wrong).
    pub errors: Vec<(usize, DownlinkError)>,
    /// The request's first items as read (at most [`RequestLimits::max_items`]), for the
    /// `down/failed` event; empty when the body has no `downlinks` array.
    pub items: Vec<Value>,
}

impl Rejection {
    fn request(error: DownlinkError, items: Vec<Value>) -> Self {
        Self {
            error,
            errors: Vec::new(),
            items,
        }
    }
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
    confirmed_retry: Option<ConfirmedRetry>,
    #[serde(default)]
    decoded_payload_warnings: Option<Vec<String>>,
}

/// `ApplicationDownlink.ConfirmedRetry`: `attempt` is the upstream's, `max_attempts` is
/// 1..=100 or absent (the server's default).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ConfirmedRetry {
    #[serde(default)]
    attempt: Option<u32>,
    #[serde(default)]
    max_attempts: Option<u32>,
}

/// Reads `value` as `T`; the error names the path of the offending field.
fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

/// Parses and validates a request body into its items, in order. On rejection, every
/// problem found is returned, each naming the item index, the field and the value.
pub fn parse_request(
    body: &[u8],
    limits: &RequestLimits,
) -> Result<Vec<Map<String, Value>>, Rejection> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Rejection::request(DownlinkError::NotJson(bounded(e.to_string())), Vec::new())
    })?;
    let Value::Object(mut request) = value else {
        return Err(Rejection::request(
            DownlinkError::Invalid("downlink request: expected an object".into()),
            Vec::new(),
        ));
    };
    let items = match request.remove("downlinks") {
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(Rejection::request(
                DownlinkError::Invalid("downlink request: downlinks: expected an array".into()),
                Vec::new(),
            ))
        }
        None => {
            return Err(Rejection::request(
                DownlinkError::Invalid("downlink request: missing field `downlinks`".into()),
                Vec::new(),
            ))
        }
    };
    let count = items.len();
    let mut items: Vec<Value> = items;
    items.truncate(limits.max_items);
    if let Some(field) = request.keys().next() {
        return Err(Rejection::request(
            DownlinkError::Invalid(bounded(format!(
                "downlink request: unknown field {}, expected `downlinks`",
                quoted(field)
            ))),
            items,
        ));
    }
    if count > limits.max_items {
        return Err(Rejection::request(
            DownlinkError::TooManyItems {
                items: count,
                max: limits.max_items,
            },
            items,
        ));
    }
    let errors: Vec<(usize, DownlinkError)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| validate_item(i, item, limits).err().map(|e| (i, e)))
        .collect();
    if let Some((_, first)) = errors.first() {
        return Err(Rejection {
            error: first.clone(),
            errors,
            items,
        });
    }
    Ok(items
        .into_iter()
        .filter_map(|item| match item {
            Value::Object(map) => Some(map),
            _ => None, // not reached: validate_item accepts objects only
        })
        .collect())
}

/// Checks item `i`; the error names the index, the field and the value.
fn validate_item(i: usize, item: &Value, limits: &RequestLimits) -> Result<(), DownlinkError> {
    let invalid = |m: String| DownlinkError::Invalid(bounded(format!("downlinks[{i}]: {m}")));
    let too_large =
        |m: String| DownlinkError::FieldTooLarge(bounded(format!("downlinks[{i}]: {m}")));
    if !item.is_object() {
        return Err(invalid(format!(
            "expected an object, found {}",
            kind_of(item)
        )));
    }
    let d: ApplicationDownlink = typed(item).map_err(invalid)?;
    if !(1..=MAX_F_PORT).contains(&d.f_port) {
        return Err(invalid(format!(
            "f_port {} out of range 1..={MAX_F_PORT}",
            d.f_port
        )));
    }
    if d.f_port == TEST_F_PORT {
        return Err(invalid(format!(
            "f_port {TEST_F_PORT} is reserved for the LoRaWAN test protocol"
        )));
    }
    if d.frm_payload.is_none() && d.decoded_payload.is_none() {
        return Err(DownlinkError::NoPayload(format!(
            "downlinks[{i}]: no payload: set frm_payload or decoded_payload"
        )));
    }
    if let Some(payload) = &d.frm_payload {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|e| invalid(format!("frm_payload is not valid base64: {e}")))?;
        if bytes.len() > MAX_FRM_PAYLOAD {
            return Err(too_large(format!(
                "frm_payload of {} bytes exceeds {MAX_FRM_PAYLOAD} bytes",
                bytes.len()
            )));
        }
    }
    if let Some(decoded) = item.get("decoded_payload") {
        let len = serde_json::to_vec(decoded).map_or(usize::MAX, |v| v.len());
        if len > limits.max_decoded_payload_bytes {
            return Err(too_large(format!(
                "decoded_payload of {len} bytes exceeds {} bytes",
                limits.max_decoded_payload_bytes
            )));
        }
    }
    let ids = d.correlation_ids.unwrap_or_default();
    if ids.len() > MAX_CORRELATION_IDS {
        return Err(too_large(format!(
            "{} correlation_ids, more than {MAX_CORRELATION_IDS}",
            ids.len()
        )));
    }
    for (j, id) in ids.iter().enumerate() {
        if id.chars().count() > MAX_CORRELATION_ID_LEN {
            return Err(too_large(format!(
                "correlation_ids[{j}] {} is longer than {MAX_CORRELATION_ID_LEN} characters",
                quoted(id)
            )));
        }
    }
    if let Some(class_b_c) = &d.class_b_c {
        check_class_b_c(class_b_c).map_err(
            |(large, m)| {
                if large {
                    too_large(m)
                } else {
                    invalid(m)
                }
            },
        )?;
    }
    let warnings = d.decoded_payload_warnings.unwrap_or_default();
    if warnings.len() > MAX_WARNINGS {
        return Err(too_large(format!(
            "{} decoded_payload_warnings, more than {MAX_WARNINGS}",
            warnings.len()
        )));
    }
    for (j, w) in warnings.iter().enumerate() {
        if w.chars().count() > MAX_WARNING_LEN {
            return Err(too_large(format!(
                "decoded_payload_warnings[{j}] {} is longer than {MAX_WARNING_LEN} characters",
                quoted(w)
            )));
        }
    }
    if let Some(key) = &d.session_key_id {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|e| invalid(format!("session_key_id is not valid base64: {e}")))?;
        if bytes.len() > MAX_SESSION_KEY_ID {
            return Err(too_large(format!(
                "session_key_id of {} bytes exceeds {MAX_SESSION_KEY_ID} bytes",
                bytes.len()
            )));
        }
    }
    if let Some(max) = d.confirmed_retry.and_then(|r| r.max_attempts) {
        if !(1..=100).contains(&max) {
            return Err(invalid(format!(
                "confirmed_retry.max_attempts {max} out of range 1..=100"
            )));
        }
    }
    Ok(())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(body: &str) -> Result<Vec<Map<String, Value>>, Rejection> {
        parse_request(body.as_bytes(), &RequestLimits::default())
    }

    fn rejection(body: &str) -> Rejection {
        parse(body).unwrap_err()
    }

    fn err(body: &str) -> String {
        rejection(body).error.to_string()
    }

    /// The error of a request with this one item.
    fn item_err(item: Value) -> DownlinkError {
        rejection(&json!({ "downlinks": [item] }).to_string()).error
    }

    #[test]
    fn seed_examples_are_valid() {
        let items =
            parse(r#"{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL"}]}"#)
                .unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["frm_payload"], "vu8=");
        let items = parse(
            r#"{"downlinks":[{"f_port":15,"decoded_payload":{"bytes":[1,2]},"confirmed":true,
                "correlation_ids":["my-correlation-id"],"class_b_c":{"absolute_time":"2026-01-01T00:00:00Z"},
                "session_key_id":"AWnj0318qrtJ7kbudd8Vmw==","f_cnt":11,"decoded_payload_warnings":[]}]}"#,
        )
        .unwrap();
        assert_eq!(items[0]["confirmed"], true);
        assert!(parse(r#"{"downlinks":[]}"#).unwrap().is_empty());
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
        assert!(err(r#"{"downlinks":[{"f_port":1}],"extra":1}"#).contains("\"extra\""));
        assert!(err(r#"{"downlinks":[1]}"#).contains("downlinks[0]"));
        assert!(err(r#"{}"#).contains("downlinks"));
        assert!(err(r#"{"downlinks":{}}"#).contains("array"));
        assert!(err(r#"[]"#).contains("object"));
        let big = base64::engine::general_purpose::STANDARD.encode([0u8; 251]);
        assert!(
            err(&json!({"downlinks":[{"f_port":1,"frm_payload":big}]}).to_string())
                .contains("251 bytes")
        );
        let long = "x".repeat(101);
        assert!(err(
            &json!({"downlinks":[{"f_port":1,"frm_payload":"","correlation_ids":[long]}]})
                .to_string()
        )
        .contains("longer than 100"));
        assert!(
            err(r#"{"downlinks":[{"f_port":1,"frm_payload":""},{"f_port":300}]}"#)
                .contains("downlinks[1]")
        );
        // Type errors name the field's path.
        let e = err(r#"{"downlinks":[{"f_port":1,"frm_payload":"","confirmed":"yes"}]}"#);
        assert!(
            e.starts_with("downlinks[0]: confirmed: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn f_port_224_is_the_test_protocol() {
        let e = item_err(json!({"f_port": 224, "frm_payload": "AQ=="}));
        assert_eq!(e.name(), "invalid_downlink");
        assert!(e.to_string().contains("f_port 224"), "{e}");
        assert!(e.to_string().contains("test protocol"), "{e}");
        for port in [223, 225] {
            let body = json!({"downlinks":[{"f_port": port, "frm_payload": "AQ=="}]});
            assert!(parse(&body.to_string()).is_ok(), "{port}");
        }
    }

    #[test]
    fn an_item_needs_a_payload() {
        let e = item_err(json!({"f_port": 1, "confirmed": true}));
        assert_eq!(e.name(), "no_payload");
        assert_eq!(
            e.to_string(),
            "downlinks[0]: no payload: set frm_payload or decoded_payload"
        );
        assert_eq!(
            item_err(json!({"f_port": 1, "frm_payload": null})).name(),
            "no_payload"
        );
        for item in [
            json!({"f_port": 1, "frm_payload": ""}),
            json!({"f_port": 1, "decoded_payload": {}}),
        ] {
            assert!(parse(&json!({ "downlinks": [item] }).to_string()).is_ok());
        }
    }

    #[test]
    fn confirmed_retry_is_typed_and_bounded() {
        let ok = |retry: Value| {
            parse(
                &json!({"downlinks":[{"f_port":1,"frm_payload":"","confirmed_retry":retry}]})
                    .to_string(),
            )
        };
        assert!(ok(json!({"attempt": 2, "max_attempts": 1})).is_ok());
        assert!(ok(json!({"max_attempts": 100})).is_ok());
        assert!(ok(json!({})).is_ok());
        for bad in [0, 101] {
            let e = ok(json!({"max_attempts": bad})).unwrap_err().error;
            assert_eq!(e.name(), "invalid_downlink");
            assert!(
                e.to_string().contains(&format!(
                    "confirmed_retry.max_attempts {bad} out of range 1..=100"
                )),
                "{e}"
            );
        }
        let e = ok(json!({"max_attempts": 3, "retries": 1}))
            .unwrap_err()
            .error;
        assert!(
            e.to_string()
                .contains("confirmed_retry.retries: unknown field `retries`"),
            "{e}"
        );
        let e = ok(json!({"max_attempts": -1})).unwrap_err().error;
        assert!(
            e.to_string().contains("confirmed_retry.max_attempts"),
            "{e}"
        );
    }

    #[test]
    fn every_field_is_bounded() {
        let too_large = |item: Value, expected: &str| {
            let e = item_err(item);
            assert_eq!(e.name(), "field_too_large", "{e}");
            assert!(
                e.to_string().contains(expected),
                "{e} should contain {expected}"
            );
        };
        let big: Map<String, Value> = (0..500).map(|i| (format!("k{i}"), json!("vvv"))).collect();
        too_large(
            json!({"f_port": 1, "decoded_payload": big}),
            "decoded_payload of 6391 bytes exceeds 4096 bytes",
        );
        let ids: Vec<String> = (0..17).map(|i| format!("id-{i}")).collect();
        too_large(
            json!({"f_port": 1, "frm_payload": "", "correlation_ids": ids}),
            "17 correlation_ids, more than 16",
        );
        let warnings: Vec<String> = (0..17).map(|i| format!("w{i}")).collect();
        too_large(
            json!({"f_port": 1, "frm_payload": "", "decoded_payload_warnings": warnings}),
            "17 decoded_payload_warnings, more than 16",
        );
        too_large(
            json!({"f_port": 1, "frm_payload": "", "decoded_payload_warnings": ["w".repeat(257)]}),
            "decoded_payload_warnings[0] \"wwwwwwwwwwwwwwwwwwwwwwww\"… (257 characters) is longer than 256",
        );
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 2049]);
        too_large(
            json!({"f_port": 1, "frm_payload": "", "session_key_id": key}),
            "session_key_id of 2049 bytes exceeds 2048 bytes",
        );
        too_large(
            json!({"f_port": 1, "frm_payload": "", "correlation_ids": ["ok", "c".repeat(60_000)]}),
            "correlation_ids[1]",
        );
        // Values are quoted short, whatever their length.
        let e = item_err(
            json!({"f_port": 1, "frm_payload": "", "correlation_ids": ["c".repeat(60_000)]}),
        );
        assert!(e.to_string().len() < 200, "{e}");
        let e = item_err(json!({"f_port": 1, "frm_payload": "", "k".repeat(60_000): 1}));
        assert!(
            e.to_string().len() <= crate::downlink::error::MAX_MESSAGE_LEN,
            "{}",
            e.to_string().len()
        );
        // At the bounds: accepted.
        let exact: Map<String, Value> = [("k".to_owned(), json!("v".repeat(4096 - 8)))]
            .into_iter()
            .collect();
        let ids: Vec<String> = (0..16).map(|_| "i".repeat(100)).collect();
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 2048]);
        let item = json!({"f_port": 1, "decoded_payload": exact, "correlation_ids": ids,
            "decoded_payload_warnings": vec!["w".repeat(256); 16], "session_key_id": key});
        assert!(parse(&json!({ "downlinks": [item] }).to_string()).is_ok());
        // A smaller configured decoded_payload bound.
        let limits = RequestLimits {
            max_items: 16,
            max_decoded_payload_bytes: 10,
        };
        let body = json!({"downlinks":[{"f_port":1,"decoded_payload":{"a":"123456"}}]}).to_string();
        let e = parse_request(body.as_bytes(), &limits).unwrap_err().error;
        assert!(
            e.to_string()
                .contains("decoded_payload of 14 bytes exceeds 10 bytes"),
            "{e}"
        );
    }

    #[test]
    fn items_per_request_are_bounded() {
        let item = json!({"f_port": 1, "frm_payload": "AQ=="});
        let body = |n: usize| json!({ "downlinks": vec![item.clone(); n] }).to_string();
        assert_eq!(parse(&body(16)).unwrap().len(), 16);
        let r = rejection(&body(17));
        assert_eq!(r.error, DownlinkError::TooManyItems { items: 17, max: 16 });
        assert_eq!(r.items.len(), 16, "the first items are kept for the event");
        assert!(r.errors.is_empty());
        let limits = RequestLimits {
            max_items: 2,
            max_decoded_payload_bytes: 4096,
        };
        assert!(parse_request(body(3).as_bytes(), &limits).is_err());
    }

    #[test]
    fn every_failing_item_is_listed() {
        let r = rejection(
            r#"{"downlinks":[{"f_port":1,"frm_payload":""},{"f_port":0},{"f_port":1,"frm_payload":""},{"f_port":2}]}"#,
        );
        let indexes: Vec<usize> = r.errors.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 3]);
        assert_eq!(r.errors[1].1.name(), "no_payload");
        assert_eq!(r.error, r.errors[0].1);
        assert_eq!(r.items.len(), 4);
    }

    #[test]
    fn limits_are_inclusive() {
        let max = base64::engine::general_purpose::STANDARD.encode([7u8; 250]);
        let body =
            json!({"downlinks":[{"f_port":233,"frm_payload":max},{"f_port":1,"frm_payload":""}]});
        assert_eq!(parse(&body.to_string()).unwrap().len(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&body, &RequestLimits::default());
        }

        #[test]
        fn f_port_range_is_exact(port in -1000i64..1000) {
            let body = json!({"downlinks":[{"f_port":port,"frm_payload":"AQ=="}]}).to_string();
            let valid = (1..=233).contains(&port) && port != 224;
            prop_assert_eq!(parse(&body).is_ok(), valid);
        }

        #[test]
        fn messages_stay_bounded(key in ".{0,2000}", value in ".{0,2000}") {
            let body = json!({"downlinks":[{"f_port":1,"frm_payload":"", key.clone(): value.clone()},
                {"f_port":1,"frm_payload":"","correlation_ids":[value.clone()]},
                {"f_port":1,"frm_payload":"","class_b_c":{"gateways":[{"gateway_ids":{"gateway_id":value}}]}}]});
            if let Err(r) = parse(&body.to_string()) {
                for (_, e) in &r.errors {
                    prop_assert!(e.to_string().len() <= crate::downlink::error::MAX_MESSAGE_LEN);
                }
            }
        }
    }
}
