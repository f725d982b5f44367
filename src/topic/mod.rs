//! v3 topics and the names behind them: identifiers, tenancy, filter rewriting and
//! matching, and the mapping between MQTT topics and NATS subjects (DESIGN §2, §4, §7).
//!
//! Everything here is pure: no I/O, no async. Every identifier that reaches a topic, a
//! subject or a Redis key has passed [`Id::parse`], which is what makes subject and key
//! injection impossible (an ID never contains `.`, `/`, `:`, `*`, `>`, `+` or `#`).
//!
//! One file per concept: IDs ([`Id`]), tenancy ([`AppRef`], [`DeviceRef`], [`Tenancy`]),
//! events ([`Event`], [`EventSet`], downlink operations), filters ([`Filter`],
//! [`Selection`]), shared subscriptions ([`SharedFilter`]) and subjects (the topic ↔ subject mapping). Everything is re-exported
//! here: callers name `crate::topic::X`, never the file.

mod event;
mod filter;
mod id;
mod share;
mod subject;
mod tenancy;

pub use event::{parse_downlink_topic, DownlinkOp, Event, EventSet};
pub use filter::{Filter, FilterError, Selection, MAX_TRAFFIC_TOPIC_LEN};
pub use id::{Id, TopicError, MAX_ID_LEN};
pub use share::{ShareKey, SharedFilter, MAX_SHARE_GROUP_LEN, SHARE_PREFIX};
pub use subject::{parse_subject_rest, topic_to_subject, SubjectEvent};
pub use tenancy::{AppRef, DeviceRef, Tenancy};
