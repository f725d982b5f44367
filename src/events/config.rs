//! `[events]`: the bounds of live events (issue 12), typed, with their defaults and their
//! validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[events]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Events published per application per second, per node (token bucket); over it
    /// they are dropped (`lorabroker_events_dropped_total{reason="rate_limited"}`).
    pub per_application_per_second: f64,
    /// How many events of one application may go at once after a quiet period.
    pub per_application_burst: u32,
    /// Sampled uplinks (`as.up.sample`) per application per second, on each node serving
    /// an event stream of it; 0 turns them off.
    pub uplink_sample_per_second: f64,
    /// Events waiting for this node's publisher task; when full, new ones are dropped
    /// (`reason="queue_full"`): publishing never slows a session.
    pub queue_capacity: usize,
    /// Event streams (SSE) served by this node at once; over it 503.
    pub max_streams: usize,
    /// Event streams of one application served by this node at once; over it 429.
    pub max_streams_per_application: usize,
    /// Events buffered per application for its streams on this node; a reader further
    /// behind loses the oldest (`reason="slow_reader"`).
    pub stream_buffer: usize,
    /// A comment line on every stream this often, so that proxies keep it open.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Applications whose message counters (`/stats`) one node keeps; further ones are
    /// not counted until the node restarts.
    pub max_stats_applications: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            per_application_per_second: 20.0,
            per_application_burst: 100,
            uplink_sample_per_second: 1.0,
            queue_capacity: 4096,
            max_streams: 100,
            max_streams_per_application: 5,
            stream_buffer: 256,
            keepalive_interval: Duration::from_secs(15),
            max_stats_applications: 10_000,
        }
    }
}

impl EventsConfig {
    /// Appends one message per bad key (named `events.…`).
    pub fn validate(&self, errors: &mut Vec<String>) {
        for (name, rate) in [
            (
                "per_application_per_second",
                self.per_application_per_second,
            ),
            ("uplink_sample_per_second", self.uplink_sample_per_second),
        ] {
            if !(rate.is_finite() && (0.0..=1e6).contains(&rate)) {
                errors.push(format!("events.{name}: {rate} out of range 0..=1000000"));
            }
        }
        for (name, value, max) in [
            ("queue_capacity", self.queue_capacity, 1 << 20),
            ("max_streams", self.max_streams, 100_000),
            (
                "max_streams_per_application",
                self.max_streams_per_application,
                100_000,
            ),
            ("stream_buffer", self.stream_buffer, 1 << 16),
            (
                "max_stats_applications",
                self.max_stats_applications,
                10_000_000,
            ),
        ] {
            if !(1..=max).contains(&value) {
                errors.push(format!("events.{name}: {value} out of range 1..={max}"));
            }
        }
        if self.per_application_burst == 0 && self.per_application_per_second > 0.0 {
            errors.push("events.per_application_burst: must be at least 1".into());
        }
        if self.keepalive_interval.is_zero() {
            errors.push("events.keepalive_interval: must be more than 0s".into());
        }
    }
}
