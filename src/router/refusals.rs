//! Refused subscriptions: why one filter was refused ([`Refusal`]), and the refusals of one
//! SUBSCRIBE packet ([`Refusals`]), reported once per packet (one log line, whatever the
//! number of filters) and counted by reason in `lorabroker_subscriptions_refused_total`;
//! the first refused filter appears as [`crate::log::Bounded`] shows client input (a short,
//! escaped, key-redacted prefix) beside its length, never the unbounded input.

use super::SubscribeError;
use crate::log::Bounded;
use crate::metrics::{Metrics, ReasonLabels};
use crate::topic::FilterError;

/// Why one filter of a SUBSCRIBE gets return code 0x80.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The key lacks `RIGHT_APPLICATION_TRAFFIC_READ`.
    #[error("the key has no traffic read right")]
    NoReadRight,
    /// The filter itself: too long, invalid, of another application, never matching.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The connection's limit, or the bus.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The persistent session's store could not take the shared subscription.
    #[error(transparent)]
    Session(crate::sessions::SessionError),
}

impl Refusal {
    /// The `reason` label of `lorabroker_subscriptions_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoReadRight => "no_read_right",
            Refusal::Filter(e) => e.reason(),
            Refusal::Subscribe(e) => e.reason(),
            Refusal::Session(crate::sessions::SessionError::Full) => "sessions_full",
            Refusal::Session(_) => "session_unavailable",
        }
    }
}

/// The refusals of one SUBSCRIBE packet, by reason.
#[derive(Default)]
pub struct Refusals {
    /// Reasons in the order first seen, with their counts (a packet meets few reasons).
    by_reason: Vec<(&'static str, u64)>,
    /// The first filter refused, as [`Bounded::id`] shows it, its length, and why.
    first: Option<(String, usize, String)>,
}

impl Refusals {
    /// Records that `filter` was refused.
    pub fn add(&mut self, refusal: &Refusal, filter: &str) {
        let reason = refusal.reason();
        match self.by_reason.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.by_reason.push((reason, 1)),
        }
        if self.first.is_none() {
            let shown = Bounded::id(filter).to_string();
            self.first = Some((shown, filter.len(), refusal.to_string()));
        }
    }

    /// How many filters were refused.
    pub fn count(&self) -> u64 {
        self.by_reason.iter().map(|(_, n)| n).sum()
    }

    /// Counts the refusals in `metrics` and logs them in one line, if there are any, out of
    /// the packet's `filters`.
    pub fn report(&self, metrics: &Metrics, filters: usize) {
        if self.by_reason.is_empty() {
            return;
        }
        for &(reason, n) in &self.by_reason {
            metrics
                .subscriptions_refused
                .get_or_create(&ReasonLabels { reason })
                .inc_by(n);
        }
        let reasons = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let (first, first_len, why) = self
            .first
            .as_ref()
            .map_or(("", 0, ""), |(f, l, w)| (f.as_str(), *l, w.as_str()));
        let refused = self.count();
        if self.by_reason.iter().any(|(r, _)| *r == "bus_unavailable") {
            tracing::warn!(refused, filters, %reasons, first, first_len, why, "subscriptions refused");
        } else {
            tracing::info!(refused, filters, %reasons, first, first_len, why, "subscriptions refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_filter_is_shown_short_and_safe() {
        let mut refusals = Refusals::default();
        let long = "v3/+/devices/".to_owned() + &"é".repeat(100);
        refusals.add(&Refusal::NoReadRight, &long);
        refusals.add(&Refusal::NoReadRight, "v3/+/devices/dev1/up");
        let (shown, len, _) = refusals.first.clone().unwrap();
        assert_eq!(len, long.len());
        assert!(shown.contains('…'), "{shown}");
        assert!(
            shown.chars().count() <= crate::log::ID_PREFIX + 20,
            "{shown}"
        );
        assert_eq!(Bounded::id("a\nb\u{1b}").to_string(), "a\\nb\\u{1b}");
    }

    /// Thousands of refused filters make one log line, which shows the first filter as an
    /// excerpt and its length, never the whole input.
    #[test]
    fn one_log_line_per_packet_and_no_unbounded_input() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let long = format!("v3/+/devices/{}/up", "x".repeat(10_000));
        tracing::subscriber::with_default(subscriber, || {
            let mut refusals = Refusals::default();
            for _ in 0..4000 {
                refusals.add(&Refusal::Filter(FilterError::NeverMatches), &long);
            }
            refusals.add(&Refusal::NoReadRight, "#");
            refusals.report(&Metrics::default(), 4001);
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("refused=4001"), "{text}");
        assert!(
            text.contains("never_matches=4000,no_read_right=1"),
            "{text}"
        );
        assert!(
            text.contains(&format!("first_len={}", long.len())),
            "{text}"
        );
        assert!(text.len() < 600, "{text}");
    }

    #[test]
    fn one_report_counts_every_refusal_by_reason() {
        let metrics = Metrics::default();
        let mut refusals = Refusals::default();
        assert_eq!(refusals.count(), 0);
        refusals.report(&metrics, 3);
        assert!(!metrics.render().contains("subscriptions_refused_total{"));
        let never = Refusal::Filter(FilterError::NeverMatches);
        let full = Refusal::Subscribe(SubscribeError::TooManyFilters(
            crate::router::TooManyFilters { max: 1 },
        ));
        refusals.add(&never, "v3/+/devices/UP/up");
        refusals.add(&full, "v3/+/devices/dev2/up");
        refusals.add(&never, "v3/+/devices/dev3/nope");
        assert_eq!(refusals.count(), 3);
        refusals.report(&metrics, 5);
        let text = metrics.render();
        assert!(
            text.contains(r#"lorabroker_subscriptions_refused_total{reason="never_matches"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lorabroker_subscriptions_refused_total{reason="max_subscriptions"} 1"#
            ),
            "{text}"
        );
    }
}
