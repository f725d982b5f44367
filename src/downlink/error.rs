//! [`DownlinkError`]: why a `down/push` or `down/replace` was rejected, and its wire form
//! in `down/failed` events.
//!
//! Every message is bounded ([`MAX_MESSAGE_LEN`]): messages name the item index, the field
//! and the value, but a value a client sent is only ever quoted as a short prefix, so that
//! neither a `down/failed` event nor a log line grows with what a client sends.

use serde_json::{json, Value};

use super::queue::QueueError;

/// Longest error message, in bytes; longer ones are cut (at a character boundary) and end
/// with `…`.
pub const MAX_MESSAGE_LEN: usize = 256;

/// Why a downlink publish was rejected. Nothing was enqueued in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownlinkError {
    /// The body is not JSON at all.
    #[error("downlink body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not a valid request; the message names the field and value.
    #[error("{0}")]
    Invalid(String),
    /// An item has neither `frm_payload` nor `decoded_payload` (The Things Stack's
    /// `no_payload`); the message names the item.
    #[error("{0}")]
    NoPayload(String),
    /// A field of an item is over its bound; the message names the item, field and bound.
    #[error("{0}")]
    FieldTooLarge(String),
    /// The request has more items than `downlink.max_items_per_request`.
    #[error("{items} downlinks in one request, more than the {max} allowed")]
    TooManyItems {
        /// Items in the request.
        items: usize,
        /// The configured bound.
        max: usize,
    },
    /// The device is not in the device registry (with `downlink.require_known_device`).
    #[error("end device {0} not found")]
    DeviceNotFound(String),
    /// The queue refused the operation (full, over a quota, or unreachable).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A PUBLISH to a topic of one of the application's devices that is not `down/push` or
    /// `down/replace` (e.g. `down/pushh`); the text is the part after the device ID,
    /// bounded. Acknowledged and dropped at the MQTT edge.
    #[error(
        "{0:?} is not a writable topic of the device: downlinks go to down/push or down/replace"
    )]
    TopicNotWritable(String),
    /// A push or replace with a key that lacks `RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE`.
    /// Acknowledged and dropped at the MQTT edge.
    #[error("the API key lacks RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE")]
    NoDownWriteRight,
}

impl DownlinkError {
    /// Stable snake_case name, used in `down/failed` errors and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "invalid_json",
            Self::Invalid(_) => "invalid_downlink",
            Self::NoPayload(_) => "no_payload",
            Self::FieldTooLarge(_) => "field_too_large",
            Self::TooManyItems { .. } => "too_many_items",
            Self::DeviceNotFound(_) => "device_not_found",
            Self::Queue(QueueError::Full { .. }) => "queue_full",
            Self::Queue(QueueError::DeviceBytes { .. }) => "device_queue_bytes_exceeded",
            Self::Queue(QueueError::ApplicationQuota { .. }) => "application_quota_exceeded",
            Self::Queue(QueueError::TenantQuota { .. }) => "tenant_quota_exceeded",
            Self::Queue(QueueError::Unavailable(_)) => "queue_unavailable",
            Self::TopicNotWritable(_) => "topic_not_writable",
            Self::NoDownWriteRight => "no_down_write_right",
        }
    }

    /// gRPC status code, as The Things Stack's errors carry: 3 invalid argument,
    /// 5 not found, 7 permission denied, 8 resource exhausted, 14 unavailable.
    pub fn code(&self) -> u32 {
        match self {
            Self::NotJson(_)
            | Self::Invalid(_)
            | Self::NoPayload(_)
            | Self::FieldTooLarge(_)
            | Self::TooManyItems { .. }
            | Self::TopicNotWritable(_) => 3,
            Self::DeviceNotFound(_) => 5,
            Self::NoDownWriteRight => 7,
            Self::Queue(QueueError::Unavailable(_)) => 14,
            Self::Queue(_) => 8,
        }
    }

    /// Whether sending the same request again later can succeed: only when the queue
    /// backend was unreachable. The MQTT edge then withholds the PUBACK/PUBREC and closes
    /// the connection so that the client retransmits; every other error is final and is
    /// acknowledged (with its `down/failed`).
    pub fn retry_helps(&self) -> bool {
        match self {
            Self::Queue(QueueError::Unavailable(_)) => true,
            Self::NotJson(_)
            | Self::Invalid(_)
            | Self::NoPayload(_)
            | Self::FieldTooLarge(_)
            | Self::TooManyItems { .. }
            | Self::DeviceNotFound(_)
            | Self::Queue(
                QueueError::Full { .. }
                | QueueError::DeviceBytes { .. }
                | QueueError::ApplicationQuota { .. }
                | QueueError::TenantQuota { .. },
            )
            | Self::TopicNotWritable(_)
            | Self::NoDownWriteRight => false,
        }
    }

    /// The error object of a `down/failed` event:
    /// `{"namespace":"lorabroker","name":…,"message_format":…,"code":…}`.
    pub fn to_error_details(&self) -> Value {
        json!({
            "namespace": "lorabroker",
            "name": self.name(),
            "message_format": bounded(self.to_string()),
            "code": self.code(),
        })
    }
}

/// `message` cut to [`MAX_MESSAGE_LEN`] bytes at a character boundary, ending with `…`
/// when it was cut.
pub fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A client-supplied string as a message quotes it: whole when short, otherwise its first
/// 24 characters and its length, so that messages stay short whatever the client sent.
pub fn quoted(value: &str) -> String {
    const SHOWN: usize = 24;
    match value.char_indices().nth(SHOWN) {
        None => format!("{value:?}"),
        Some((end, _)) => format!(
            "{:?}… ({} characters)",
            &value[..end],
            value.chars().count()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_name_the_problem() {
        let full = DownlinkError::Queue(QueueError::Full {
            queued: 2,
            adding: 2,
            capacity: 3,
        });
        let d = full.to_error_details();
        assert_eq!(d["namespace"], "lorabroker");
        assert_eq!(d["name"], "queue_full");
        assert_eq!(d["code"], 8);
        assert!(d["message_format"].as_str().unwrap().contains("full"));
        assert_eq!(DownlinkError::NotJson("x".into()).code(), 3);
        assert_eq!(
            DownlinkError::Queue(QueueError::Unavailable("down".into())).code(),
            14
        );
        assert_eq!(DownlinkError::NoDownWriteRight.code(), 7);
        let typo = DownlinkError::TopicNotWritable("down/pushh".into()).to_error_details();
        assert_eq!(typo["name"], "topic_not_writable");
        assert!(typo["message_format"]
            .as_str()
            .unwrap()
            .contains("down/pushh"));
    }

    #[test]
    fn only_an_unreachable_queue_is_worth_a_retry() {
        assert!(DownlinkError::Queue(QueueError::Unavailable("down".into())).retry_helps());
        for final_error in [
            DownlinkError::NotJson("x".into()),
            DownlinkError::Invalid("x".into()),
            DownlinkError::Queue(QueueError::Full {
                queued: 1,
                adding: 1,
                capacity: 1,
            }),
            DownlinkError::TopicNotWritable("up".into()),
            DownlinkError::NoDownWriteRight,
        ] {
            assert!(!final_error.retry_helps(), "{final_error}");
        }
    }

    #[test]
    fn every_variant_has_its_name_and_code() {
        let quota = |e| DownlinkError::Queue(e);
        let cases = [
            (DownlinkError::Invalid("x".into()), "invalid_downlink", 3),
            (DownlinkError::NoPayload("x".into()), "no_payload", 3),
            (
                DownlinkError::FieldTooLarge("x".into()),
                "field_too_large",
                3,
            ),
            (
                DownlinkError::TooManyItems { items: 17, max: 16 },
                "too_many_items",
                3,
            ),
            (
                DownlinkError::DeviceNotFound("dev1".into()),
                "device_not_found",
                5,
            ),
            (
                quota(QueueError::DeviceBytes {
                    queued: 1,
                    adding: 2,
                    limit: 2,
                }),
                "device_queue_bytes_exceeded",
                8,
            ),
            (
                quota(QueueError::ApplicationQuota {
                    queued: 1,
                    adding: 2,
                    limit: 2,
                }),
                "application_quota_exceeded",
                8,
            ),
            (
                quota(QueueError::TenantQuota {
                    queued: 1,
                    adding: 2,
                    limit: 2,
                }),
                "tenant_quota_exceeded",
                8,
            ),
        ];
        for (e, name, code) in cases {
            assert_eq!((e.name(), e.code()), (name, code), "{e}");
            assert_eq!(e.to_error_details()["name"], name);
        }
        let many = DownlinkError::TooManyItems { items: 17, max: 16 }.to_string();
        assert!(many.contains("17") && many.contains("16"), "{many}");
    }

    #[test]
    fn messages_and_quotes_are_bounded() {
        let long = DownlinkError::Invalid("é".repeat(1000)).to_error_details();
        let message = long["message_format"].as_str().unwrap();
        assert!(message.len() <= MAX_MESSAGE_LEN, "{}", message.len());
        assert!(message.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
        assert_eq!(quoted("abc"), "\"abc\"");
        let q = quoted(&"x".repeat(60_000));
        assert!(q.len() < 60, "{q}");
        assert!(q.contains("60000 characters"), "{q}");
        assert!(quoted("a\"b\u{0}").starts_with("\"a\\\"b\\0"));
    }
}
