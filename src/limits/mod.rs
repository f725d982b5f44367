//! Rate limits and connection quotas (DESIGN §9, issue 9 points 3 and 4): the [`Limits`]
//! of a node, built once from `[limits]` and handed down through the `App`. Each limit is
//! a value with a name, a default, a metric and a test:
//!
//! | limit | key | over it | metric |
//! |---|---|---|---|
//! | `accepts_per_ip` | source IP (/64) | closed before any read | `rate_limited_total{limit="accepts_per_ip"}` |
//! | `failed_connects_per_ip` | source IP (/64) | CONNACK 5 for a cool-down, key store not asked | `…{limit="failed_connects_per_ip"}` |
//! | `connects_per_key` | API key | CONNACK 3 | `…{limit="connects_per_key"}` |
//! | `downlinks_per_key`, `downlinks_per_application` | key, application | dropped and acknowledged; one `down/failed` `rate_limited` per `rate_limited_reports_per_key`; disconnected past `downlink_disconnect_after` | `…{limit="downlinks_per_key"}` … |
//! | `subscribes_per_connection` | connection | SUBACK 0x80 for every filter | `…{limit="subscribes_per_connection"}` |
//! | `max_connections_per_{tenant,application,key}` | cluster-wide | CONNACK 3 | `quota_refused_total{scope}` |
//!
//! Rate limits are per node (effective limit = per-node × nodes); quotas are cluster-wide
//! through a [`QuotaStore`]. This module decides; the protocol edge (`mqtt/`, `server.rs`)
//! maps decisions to the wire.

pub mod ban;
pub mod config;
pub mod quota;
pub mod rate;

use std::net::IpAddr;
use std::sync::Arc;

pub use ban::FlappingBan;
pub use config::{LimitsConfig, Rate};
pub use quota::{
    Admission, ConnectionQuotas, MemoryQuotaStore, QuotaError, QuotaLimits, QuotaStore, Scope,
    ScopeKind,
};
pub use rate::{ip_key, KeyedRate};

use crate::metrics::{LimitLabels, Metrics};
use crate::topic::AppRef;

/// What to do with a downlink publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownlinkVerdict {
    /// Within every limit.
    Allowed,
    /// Over `limit`: drop it. `report` says whether this one gets a `down/failed`
    /// (the reports have their own rate, so that a flood cannot amplify through them).
    Limited {
        /// The limit that bit.
        limit: &'static str,
        /// Whether to publish a `down/failed` `rate_limited` for it.
        report: bool,
    },
}

/// Every rate limiter and the connection quotas of one node.
pub struct Limits {
    /// The settings they were built from.
    pub config: LimitsConfig,
    accepts: KeyedRate<IpAddr>,
    ban: FlappingBan,
    connects: KeyedRate<String>,
    downlinks_per_key: KeyedRate<String>,
    downlinks_per_app: KeyedRate<AppRef>,
    reports: KeyedRate<String>,
    subscribes: KeyedRate<u64>,
    /// Cluster-wide connection quotas.
    pub quotas: ConnectionQuotas,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// The limits of `config`, with quotas counted in `store`.
    pub fn new(config: LimitsConfig, store: Arc<dyn QuotaStore>, metrics: Arc<Metrics>) -> Self {
        let max = config.max_tracked_keys;
        Self {
            accepts: KeyedRate::new(config.accepts_per_ip, max),
            ban: FlappingBan::new(
                config.failed_connects_per_ip,
                config.failed_connect_cooldown,
                max,
            ),
            connects: KeyedRate::new(config.connects_per_key, max),
            downlinks_per_key: KeyedRate::new(config.downlinks_per_key, max),
            downlinks_per_app: KeyedRate::new(config.downlinks_per_application, max),
            reports: KeyedRate::new(config.rate_limited_reports_per_key, max),
            subscribes: KeyedRate::new(config.subscribes_per_connection, max),
            quotas: ConnectionQuotas::new(
                store,
                QuotaLimits {
                    tenant: config.max_connections_per_tenant,
                    application: config.max_connections_per_application,
                    key: config.max_connections_per_key,
                },
                metrics.clone(),
            ),
            metrics,
            config,
        }
    }

    fn limited(&self, limit: &'static str) {
        self.metrics
            .rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// Whether a TCP connection from `ip` may be served; counted when not.
    pub fn allow_accept(&self, ip: IpAddr) -> bool {
        let ok = self.accepts.check(&ip_key(ip));
        if !ok {
            self.limited("accepts_per_ip");
        }
        ok
    }

    /// Whether logins from `ip` are refused for a cool-down; counted when they are.
    pub async fn is_banned(&self, ip: IpAddr) -> bool {
        let banned = self.ban.is_banned(ip).await;
        if banned {
            self.limited("failed_connects_per_ip");
        }
        banned
    }

    /// Counts a failed login from `ip`; `true` when it starts a cool-down.
    pub async fn login_failed(&self, ip: IpAddr) -> bool {
        self.ban.failed(ip).await
    }

    /// Whether a login with `key_id` may go on; counted when not.
    pub fn allow_connect(&self, key_id: &str) -> bool {
        let ok = self.connects.check(&key_id.to_owned());
        if !ok {
            self.limited("connects_per_key");
        }
        ok
    }

    /// Whether a downlink publish of `app` with `key_id` is within the limits; counted when
    /// not.
    pub fn downlink(&self, app: &AppRef, key_id: &str) -> DownlinkVerdict {
        let key = key_id.to_owned();
        let limit = if !self.downlinks_per_key.check(&key) {
            "downlinks_per_key"
        } else if !self.downlinks_per_app.check(app) {
            "downlinks_per_application"
        } else {
            return DownlinkVerdict::Allowed;
        };
        self.limited(limit);
        DownlinkVerdict::Limited {
            limit,
            report: self.reports.check(&key),
        }
    }

    /// Whether connection `connection` may SUBSCRIBE now; counted when not.
    pub fn allow_subscribe(&self, connection: u64) -> bool {
        let ok = self.subscribes.check(&connection);
        if !ok {
            self.limited("subscribes_per_connection");
        }
        ok
    }

    /// Forgets idle keys of every limiter.
    pub fn sweep(&self) {
        self.accepts.sweep();
        self.ban.sweep();
        self.connects.sweep();
        self.downlinks_per_key.sweep();
        self.downlinks_per_app.sweep();
        self.reports.sweep();
        self.subscribes.sweep();
    }
}

/// Sweeps the limiters and renews the quota lease, each on its interval, until dropped
/// (the node aborts it at shutdown).
pub async fn housekeeping(limits: Arc<Limits>) {
    let mut sweep = tokio::time::interval(limits.config.sweep_interval);
    let mut refresh = tokio::time::interval(limits.config.quota_refresh_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sweep.tick() => limits.sweep(),
            _ = refresh.tick() => limits.quotas.refresh().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;

    fn limits(config: LimitsConfig) -> (Limits, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let l = Limits::new(config, Arc::new(MemoryQuotaStore::new()), metrics.clone());
        (l, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn downlinks_are_limited_per_key_then_per_application_and_reports_are_rare() {
        let (l, metrics) = limits(LimitsConfig {
            downlinks_per_key: Rate::new(1.0, 2),
            downlinks_per_application: Rate::new(1.0, 3),
            rate_limited_reports_per_key: Rate::new(0.1, 1),
            ..LimitsConfig::default()
        });
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        assert_eq!(l.downlink(&app, "K1"), DownlinkVerdict::Allowed);
        assert_eq!(l.downlink(&app, "K1"), DownlinkVerdict::Allowed);
        let mut reports = 0;
        for _ in 0..100 {
            match l.downlink(&app, "K1") {
                DownlinkVerdict::Limited { limit, report } => {
                    assert_eq!(limit, "downlinks_per_key");
                    reports += usize::from(report);
                }
                DownlinkVerdict::Allowed => panic!("over the key's burst"),
            }
        }
        assert_eq!(reports, 1, "one down/failed for a hundred drops");
        // A second key of the same application has its own budget, but the application's
        // is shared: one more passes, then the application limit bites.
        assert_eq!(l.downlink(&app, "K2"), DownlinkVerdict::Allowed);
        assert!(matches!(
            l.downlink(&app, "K2"),
            DownlinkVerdict::Limited {
                limit: "downlinks_per_application",
                ..
            }
        ));
        let text = metrics.render();
        assert!(
            text.contains("lorabroker_rate_limited_total{limit=\"downlinks_per_key\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("lorabroker_rate_limited_total{limit=\"downlinks_per_application\"} 1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connects_subscribes_and_accepts_are_counted_by_limit() {
        let (l, metrics) = limits(LimitsConfig {
            accepts_per_ip: Rate::new(1.0, 1),
            connects_per_key: Rate::new(1.0, 1),
            subscribes_per_connection: Rate::new(1.0, 1),
            ..LimitsConfig::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.allow_accept(ip) && !l.allow_accept(ip));
        assert!(l.allow_connect("K") && !l.allow_connect("K"));
        assert!(l.allow_subscribe(7) && !l.allow_subscribe(7) && l.allow_subscribe(8));
        let text = metrics.render();
        for limit in [
            "accepts_per_ip",
            "connects_per_key",
            "subscribes_per_connection",
        ] {
            assert!(
                text.contains(&format!(
                    "lorabroker_rate_limited_total{{limit=\"{limit}\"}} 1"
                )),
                "{limit}: {text}"
            );
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
    fn limits_are_set_and_turned_off_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_LIMITS__ACCEPTS_PER_IP__PER_SECOND", "0");
            jail.set_env("LORABROKER_LIMITS__CONNECTS_PER_KEY__BURST", "7");
            jail.set_env("LORABROKER_LIMITS__MAX_CONNECTIONS_PER_KEY", "0");
            let c = crate::config::Config::load(None, serde_json::json!({}))
                .map_err(|e| e.to_string())?;
            assert!(!c.limits.accepts_per_ip.is_on());
            assert_eq!(c.limits.connects_per_key, Rate::new(2.0, 7));
            assert_eq!(c.limits.max_connections_per_key, 0);
            Ok(())
        });
    }

    #[test]
    fn the_defaults_are_valid_and_bad_values_are_named() {
        let mut errors = Vec::new();
        LimitsConfig::default().validate(&mut errors);
        LimitsConfig::unlimited().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let bad = LimitsConfig {
            accepts_per_ip: Rate::new(-1.0, 1),
            connects_per_key: Rate::new(1.0, 0),
            quota_lease: std::time::Duration::from_secs(1),
            ..LimitsConfig::default()
        };
        bad.validate(&mut errors);
        let all = errors.join("\n");
        assert!(all.contains("limits.accepts_per_ip.per_second"), "{all}");
        assert!(all.contains("limits.connects_per_key.burst"), "{all}");
        assert!(all.contains("limits.quota_lease"), "{all}");
    }
}
