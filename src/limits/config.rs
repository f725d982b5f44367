//! `[limits]`: every rate limit and connection quota of a node, typed, with its default and
//! its validation. [`super::Limits`] is built from it once and handed down.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A GCRA rate: `per_second` sustained, with bursts of up to `burst` at once.
/// `per_second = 0` turns the limit off.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained rate; fractions are allowed (0.1 is one every 10 s); 0 is off.
    pub per_second: f64,
    /// How many may come at once after a quiet period (at least 1 when on).
    pub burst: u32,
}

impl Rate {
    /// A rate of `per_second` with bursts of `burst`.
    pub const fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst }
    }

    /// The limit turned off.
    pub const OFF: Rate = Rate::new(0.0, 0);

    /// Whether the limit is on.
    pub fn is_on(&self) -> bool {
        self.per_second > 0.0
    }
}

/// `[limits]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// TCP connections accepted per source IP (IPv6 per /64), per node; over it a
    /// connection is closed at once, before anything is read.
    pub accepts_per_ip: Rate,
    /// Failed logins (bad credentials, unknown or wrong key) per source IP, per node; over
    /// it the IP is refused for `failed_connect_cooldown` without asking the key store.
    pub failed_connects_per_ip: Rate,
    /// How long a source IP over `failed_connects_per_ip` is refused (CONNACK 5).
    #[serde(with = "humantime_serde")]
    pub failed_connect_cooldown: Duration,
    /// Successful logins per API key, per node; over it CONNACK 3.
    pub connects_per_key: Rate,
    /// Downlink publishes (`down/push`, `down/replace`) per API key, per node.
    pub downlinks_per_key: Rate,
    /// Downlink publishes per application, per node.
    pub downlinks_per_application: Rate,
    /// `down/failed` events with `rate_limited` per API key, per node: the refusals
    /// themselves must not amplify a flood.
    pub rate_limited_reports_per_key: Rate,
    /// A connection whose rate-limited downlinks outnumber its accepted ones by this many is
    /// disconnected; 0 never disconnects.
    pub downlink_disconnect_after: u32,
    /// SUBSCRIBE packets per connection; over it every filter of the packet gets 0x80.
    pub subscribes_per_connection: Rate,
    /// Most keys (IPs, API keys, applications, connections) one limiter remembers; past it
    /// idle keys are forgotten at once rather than at the next sweep.
    pub max_tracked_keys: usize,
    /// How often idle limiter keys are forgotten.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Connections per tenant, across the cluster; 0 is unlimited.
    pub max_connections_per_tenant: u64,
    /// Connections per application, across the cluster; 0 is unlimited.
    pub max_connections_per_application: u64,
    /// Connections per API key, across the cluster; 0 is unlimited.
    pub max_connections_per_key: u64,
    /// How often a node renews its connection counts in Redis.
    #[serde(with = "humantime_serde")]
    pub quota_refresh_interval: Duration,
    /// How long a node's counts live in Redis without renewal (a dead node's connections
    /// stop counting after this).
    #[serde(with = "humantime_serde")]
    pub quota_lease: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            accepts_per_ip: Rate::new(50.0, 500),
            failed_connects_per_ip: Rate::new(0.5, 20),
            failed_connect_cooldown: Duration::from_secs(60),
            connects_per_key: Rate::new(2.0, 50),
            downlinks_per_key: Rate::new(20.0, 100),
            downlinks_per_application: Rate::new(100.0, 500),
            rate_limited_reports_per_key: Rate::new(0.1, 1),
            downlink_disconnect_after: 1000,
            subscribes_per_connection: Rate::new(5.0, 50),
            max_tracked_keys: 100_000,
            sweep_interval: Duration::from_secs(10),
            max_connections_per_tenant: 0,
            max_connections_per_application: 1000,
            max_connections_per_key: 100,
            quota_refresh_interval: Duration::from_secs(2),
            quota_lease: Duration::from_secs(6),
        }
    }
}

impl LimitsConfig {
    /// Every limit off and every quota unlimited (test fixtures that connect everything
    /// from one address with one key).
    pub fn unlimited() -> Self {
        Self {
            accepts_per_ip: Rate::OFF,
            failed_connects_per_ip: Rate::OFF,
            connects_per_key: Rate::OFF,
            downlinks_per_key: Rate::OFF,
            downlinks_per_application: Rate::OFF,
            rate_limited_reports_per_key: Rate::OFF,
            downlink_disconnect_after: 0,
            subscribes_per_connection: Rate::OFF,
            max_connections_per_tenant: 0,
            max_connections_per_application: 0,
            max_connections_per_key: 0,
            ..Self::default()
        }
    }

    /// Appends one message per bad key (named `limits.…`).
    pub fn validate(&self, errors: &mut Vec<String>) {
        let rates = [
            ("accepts_per_ip", self.accepts_per_ip),
            ("failed_connects_per_ip", self.failed_connects_per_ip),
            ("connects_per_key", self.connects_per_key),
            ("downlinks_per_key", self.downlinks_per_key),
            ("downlinks_per_application", self.downlinks_per_application),
            (
                "rate_limited_reports_per_key",
                self.rate_limited_reports_per_key,
            ),
            ("subscribes_per_connection", self.subscribes_per_connection),
        ];
        for (name, rate) in rates {
            if !(rate.per_second.is_finite() && (0.0..=1e6).contains(&rate.per_second)) {
                errors.push(format!(
                    "limits.{name}.per_second: {} out of range 0..=1000000 (0 is off)",
                    rate.per_second
                ));
            } else if rate.is_on() && (rate.per_second < 1e-4) {
                errors.push(format!(
                    "limits.{name}.per_second: {} is below one per 10000 s; use 0 to turn it off",
                    rate.per_second
                ));
            } else if rate.is_on() && rate.burst == 0 {
                errors.push(format!(
                    "limits.{name}.burst: must be at least 1 when the limit is on"
                ));
            }
        }
        let nonzero = [
            ("failed_connect_cooldown", self.failed_connect_cooldown),
            ("sweep_interval", self.sweep_interval),
            ("quota_refresh_interval", self.quota_refresh_interval),
        ];
        for (name, d) in nonzero {
            if d.is_zero() {
                errors.push(format!("limits.{name}: must be more than 0s"));
            }
        }
        if self.max_tracked_keys == 0 {
            errors.push("limits.max_tracked_keys: must be at least 1".into());
        }
        if self.quota_lease < self.quota_refresh_interval * 2 {
            errors.push(format!(
                "limits.quota_lease: {:?} must be at least twice limits.quota_refresh_interval ({:?})",
                self.quota_lease, self.quota_refresh_interval
            ));
        }
    }
}
