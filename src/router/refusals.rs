//! Refused subscriptions: why one filter was refused ([`Refusal`]), and the refusals of one
//! SUBSCRIBE packet ([`Refusals`]), reported once per packet (one log line, whatever the
//! number of filters) and counted by reason in `lorabroker_subscriptions_refused_total`;
//! and [`Excerpt`], how a client's filter appears in a log line: a short prefix beside its
//! length, never the unbounded input.

use std::fmt::{self, Write};

use super::SubscribeError;
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
}

impl Refusal {
    /// The `reason` label of `lorabroker_subscriptions_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoReadRight => "no_read_right",
            Refusal::Filter(e) => e.reason(),
            Refusal::Subscribe(e) => e.reason(),
        }
    }
}

/// The refusals of one SUBSCRIBE packet, by reason.
#[derive(Default)]
pub struct Refusals {
    /// Reasons in the order first seen, with their counts (a packet meets few reasons).
    by_reason: Vec<(&'static str, u64)>,
    /// The first filter refused, cut to [`Excerpt::MAX`] bytes, its length, and why.
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
            let shown = Excerpt(filter).to_string();
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

/// A string from a client as logs show it: at most [`Excerpt::MAX`] bytes of it (cut at a
/// character boundary, control characters escaped), then `…` if it was longer. Log its
/// length beside it.
pub struct Excerpt<'a>(pub &'a str);

impl Excerpt<'_> {
    /// Longest prefix shown, in bytes.
    pub const MAX: usize = 48;
}

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut end = self.0.len().min(Self::MAX);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        for c in self.0[..end].chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        if end < self.0.len() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_safe() {
        assert_eq!(
            Excerpt("v3/+/devices/dev1/up").to_string(),
            "v3/+/devices/dev1/up"
        );
        let long = "v3/+/devices/".to_owned() + &"é".repeat(100);
        let shown = Excerpt(&long).to_string();
        assert!(shown.ends_with('…'), "{shown}");
        assert!(shown.len() <= Excerpt::MAX + '…'.len_utf8(), "{shown}");
        assert_eq!(Excerpt("a\nb\u{1b}").to_string(), "a\\nb\\u{1b}");
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
