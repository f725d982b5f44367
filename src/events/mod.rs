//! Live events of an application, cluster-wide (DESIGN §10, issue 12): what happens to its
//! MQTT clients (connects, refused connects with The Things Stack's wording, disconnects
//! with their reason, refused subscriptions and publishes), its downlinks, and sampled
//! uplinks, as The Things Stack's events.
//!
//! Every node emits its events through its [`Publisher`] (rate-limited per application,
//! never blocking a session) onto the bus subject `lorabroker.events.{tenant}.{app}`; the
//! node serving an event stream ([`Hub`], SSE over HTTP) subscribes to that subject, so a
//! stream sees the events of every node. [`TrafficStats`] keeps the per-application message
//! counters behind `/stats`. This module knows nothing of HTTP or MQTT.

pub mod config;
pub mod event;
pub mod hub;
pub mod publisher;
pub mod stats;

pub use config::EventsConfig;
pub use event::{bounded, data, names, Event};
pub use hub::{EventStream, Frame, Hub, OpenError};
pub use publisher::Publisher;
pub use stats::{AppCounters, Counts, TrafficStats};
