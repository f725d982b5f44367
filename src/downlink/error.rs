//! [`DownlinkError`]: why a `down/push` or `down/replace` was rejected, and its wire form
//! in `down/failed` events.

use serde_json::{json, Value};

use super::queue::QueueError;

/// Why a downlink publish was rejected. Nothing was enqueued in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownlinkError {
    /// The body is not JSON at all.
    #[error("downlink body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not a valid request; the message names the field and value.
    #[error("{0}")]
    Invalid(String),
    /// The queue refused the operation (full or unreachable).
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
    /// Over a downlink rate limit (named as in `[limits]`); dropped and acknowledged at
    /// the MQTT edge.
    #[error("downlink rate limit limits.{0} exceeded: publish dropped")]
    RateLimited(&'static str),
}

impl DownlinkError {
    /// Stable snake_case name, used in `down/failed` errors and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "invalid_json",
            Self::Invalid(_) => "invalid_downlink",
            Self::Queue(QueueError::Full { .. }) => "queue_full",
            Self::Queue(QueueError::Unavailable(_)) => "queue_unavailable",
            Self::TopicNotWritable(_) => "topic_not_writable",
            Self::NoDownWriteRight => "no_down_write_right",
            Self::RateLimited(_) => "rate_limited",
        }
    }

    /// gRPC status code, as The Things Stack's errors carry: 3 invalid argument,
    /// 7 permission denied, 8 resource exhausted, 14 unavailable.
    pub fn code(&self) -> u32 {
        match self {
            Self::NotJson(_) | Self::Invalid(_) | Self::TopicNotWritable(_) => 3,
            Self::NoDownWriteRight => 7,
            Self::RateLimited(_) => 8,
            Self::Queue(QueueError::Full { .. }) => 8,
            Self::Queue(QueueError::Unavailable(_)) => 14,
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
            | Self::Queue(QueueError::Full { .. })
            | Self::TopicNotWritable(_)
            | Self::NoDownWriteRight
            | Self::RateLimited(_) => false,
        }
    }

    /// The error object of a `down/failed` event:
    /// `{"namespace":"lorabroker","name":…,"message_format":…,"code":…}`.
    pub fn to_error_details(&self) -> Value {
        json!({
            "namespace": "lorabroker",
            "name": self.name(),
            "message_format": self.to_string(),
            "code": self.code(),
        })
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
}
