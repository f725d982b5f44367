//! Backend health as an operator sees it: the `lorabroker_backend_up` gauge, and log
//! lines that say when a backend became unreachable and when it came back, instead of
//! one line per failed attempt.
//!
//! [`Outage`] is the bookkeeping (pure, so its timing is tested without sleeping);
//! [`watch`] runs on every node and probes the stores, which (unlike NATS, whose client
//! reports its own connection events to `bus::nats`) fail only when something uses them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::metrics::BackendLabels;

/// Time between two probes of the stores by [`watch`].
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// The first reminder that a backend is still unreachable comes this long after the
/// first failure; each further one waits twice as long, up to [`REMINDER_MAX`].
pub const REMINDER_FIRST: Duration = Duration::from_secs(10);
/// Longest time between two reminders.
pub const REMINDER_MAX: Duration = Duration::from_secs(300);

/// What to log after an attempt to reach a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The first failure after being reachable (or since the start).
    Unreachable,
    /// Still failing: `failures` attempts over `for_`.
    StillUnreachable {
        /// Failed attempts since the outage began.
        failures: u64,
        /// Time since the first failure.
        for_: Duration,
    },
    /// Reachable again after `failures` failed attempts over `after`.
    Recovered {
        /// Failed attempts during the outage.
        failures: u64,
        /// Length of the outage.
        after: Duration,
    },
}

/// The state of one backend between attempts.
#[derive(Debug, Clone)]
pub struct Outage {
    /// When the current outage began, and its failed attempts.
    current: Option<(Instant, u64)>,
    /// When the next reminder is due, and the wait after it.
    next_reminder: Option<(Instant, Duration)>,
    /// Whether reminders are logged while the outage lasts.
    reminders: bool,
}

impl Outage {
    /// Reports the first failure, then reminders with a doubling interval.
    pub fn with_reminders() -> Self {
        Self {
            current: None,
            next_reminder: None,
            reminders: true,
        }
    }

    /// Reports only changes: unreachable, then recovered.
    pub fn changes_only() -> Self {
        Self {
            reminders: false,
            ..Self::with_reminders()
        }
    }

    /// Whether the backend is in an outage.
    pub fn is_down(&self) -> bool {
        self.current.is_some()
    }

    /// A failed attempt at `now`; what to log, if anything.
    pub fn failed(&mut self, now: Instant) -> Option<Report> {
        let Some((since, failures)) = &mut self.current else {
            self.current = Some((now, 1));
            self.next_reminder = Some((now + REMINDER_FIRST, REMINDER_FIRST));
            return Some(Report::Unreachable);
        };
        *failures += 1;
        let (due, wait) = self.next_reminder?;
        if !self.reminders || now < due {
            return None;
        }
        let wait = (wait * 2).min(REMINDER_MAX);
        self.next_reminder = Some((now + wait, wait));
        Some(Report::StillUnreachable {
            failures: *failures,
            for_: now.saturating_duration_since(*since),
        })
    }

    /// A successful attempt at `now`; what to log, if anything.
    pub fn succeeded(&mut self, now: Instant) -> Option<Report> {
        let (since, failures) = self.current.take()?;
        self.next_reminder = None;
        Some(Report::Recovered {
            failures,
            after: now.saturating_duration_since(since),
        })
    }
}

/// Logs `report` about the backend `what` (e.g. `Redis at redis://…`).
pub fn log(what: &str, report: &Report, error: Option<&str>) {
    let error = error.unwrap_or("");
    match report {
        Report::Unreachable => {
            tracing::warn!(error, "cannot reach {what}; retrying (not ready meanwhile)")
        }
        Report::StillUnreachable { failures, for_ } => tracing::warn!(
            error,
            failures,
            "still cannot reach {what} after {}",
            humantime::format_duration(round(*for_))
        ),
        Report::Recovered { failures, after } => tracing::info!(
            failures,
            "{what} reachable again after {}",
            humantime::format_duration(round(*after))
        ),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

/// Probes the stores every [`PROBE_INTERVAL`] until `stop`: logs outages of Redis and
/// keeps `lorabroker_backend_up` current for the bus and the stores.
pub async fn watch(app: Arc<App>, stop: CancellationToken) {
    let redis = app
        .config
        .redis
        .is_enabled()
        .then(|| app.config.redis.describe());
    let mut outage = Outage::changes_only();
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (keys, queue) = tokio::join!(app.keys.ping(), app.queue.ping());
        let error = match (keys, queue) {
            (Err(e), _) => Some(e.to_string()),
            (_, Err(e)) => Some(e.to_string()),
            _ => None,
        };
        set_up(&app, "bus", app.bus.is_ready());
        set_up(&app, "store", error.is_none());
        let now = Instant::now();
        let report = match &error {
            Some(_) => outage.failed(now),
            None => outage.succeeded(now),
        };
        if let (Some(report), Some(what)) = (report, &redis) {
            log(what, &report, error.as_deref());
        }
    }
}

fn set_up(app: &App, backend: &'static str, up: bool) {
    app.metrics
        .backend_up
        .get_or_create(&BackendLabels { backend })
        .set(i64::from(up));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_once_then_with_doubling_reminders_then_recovery() {
        let t0 = Instant::now();
        let mut o = Outage::with_reminders();
        assert_eq!(o.succeeded(t0), None, "nothing to say while reachable");
        assert_eq!(o.failed(t0), Some(Report::Unreachable));
        // Attempts every 500 ms for a minute: reminders at 10 s, 30 s, 70 s…
        let mut reminders = Vec::new();
        for i in 1..=120u32 {
            let now = t0 + Duration::from_millis(500) * i;
            if let Some(r) = o.failed(now) {
                reminders.push((now - t0, r));
            }
        }
        assert_eq!(
            reminders,
            [
                (
                    Duration::from_secs(10),
                    Report::StillUnreachable {
                        failures: 21,
                        for_: Duration::from_secs(10)
                    }
                ),
                (
                    Duration::from_secs(30),
                    Report::StillUnreachable {
                        failures: 61,
                        for_: Duration::from_secs(30)
                    }
                ),
            ]
        );
        assert!(o.is_down());
        let back = t0 + Duration::from_secs(61);
        assert_eq!(
            o.succeeded(back),
            Some(Report::Recovered {
                failures: 121,
                after: Duration::from_secs(61)
            })
        );
        assert!(!o.is_down());
        assert_eq!(o.succeeded(back), None);
        assert_eq!(o.failed(back), Some(Report::Unreachable), "a new outage");
    }

    #[test]
    fn reminders_are_capped() {
        let t0 = Instant::now();
        let mut o = Outage::with_reminders();
        o.failed(t0);
        let mut last = None;
        let mut gaps = Vec::new();
        for s in 1..=3600u64 {
            let now = t0 + Duration::from_secs(s);
            if o.failed(now).is_some() {
                if let Some(prev) = last {
                    gaps.push(now - prev);
                }
                last = Some(now);
            }
        }
        assert!(gaps.iter().all(|g| *g <= REMINDER_MAX), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&REMINDER_MAX));
    }

    #[test]
    fn changes_only_never_reminds() {
        let t0 = Instant::now();
        let mut o = Outage::changes_only();
        assert_eq!(o.failed(t0), Some(Report::Unreachable));
        for s in 1..=1000u64 {
            assert_eq!(o.failed(t0 + Duration::from_secs(s)), None);
        }
        assert!(matches!(
            o.succeeded(t0 + Duration::from_secs(1001)),
            Some(Report::Recovered { failures: 1001, .. })
        ));
    }
}
