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
}

impl DownlinkError {
    /// Stable snake_case name, used in `down/failed` errors and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "invalid_json",
            Self::Invalid(_) => "invalid_downlink",
            Self::Queue(QueueError::Full { .. }) => "queue_full",
            Self::Queue(QueueError::Unavailable(_)) => "queue_unavailable",
        }
    }

    /// gRPC status code, as The Things Stack's errors carry: 3 invalid argument,
    /// 8 resource exhausted, 14 unavailable.
    pub fn code(&self) -> u32 {
        match self {
            Self::NotJson(_) | Self::Invalid(_) => 3,
            Self::Queue(QueueError::Full { .. }) => 8,
            Self::Queue(QueueError::Unavailable(_)) => 14,
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
    }
}
