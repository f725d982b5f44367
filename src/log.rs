//! What client input may reach a log: bounded, escaped, and without secrets.
//!
//! - [`Bounded`] shows a client's string (username, client ID, topic, filter, or an error
//!   message that quotes one) as an escaped prefix plus its length, so that a 60 KB
//!   username costs a log line of a hundred bytes, and a newline cannot forge a line.
//! - Anything shaped like an API key (`NNSXS.<ID>.<SECRET>`, anywhere in the string, in any
//!   case, also when mangled) is shown as its key ID (`NNSXS.<ID>.***`) before it is cut:
//!   a client that swaps username and password does not get its secret written to the log.
//! - [`LogLimiter`] lets through one refusal line per peer per interval and counts the
//!   others, which the next line that gets through reports (`suppressed = n`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::auth::key::{ID_LEN, KEY_PREFIX};

/// Characters of a client identifier (username, client ID, topic, filter) shown in logs.
pub const ID_PREFIX: usize = 48;
/// Characters of a message quoting client input shown in logs.
pub const MESSAGE_PREFIX: usize = 240;

/// A client's string for a log field: the API keys in it reduced to their IDs, then at
/// most a prefix of it, escaped, with the full length when it was cut.
#[derive(Clone, Copy)]
pub struct Bounded<'a> {
    text: &'a str,
    prefix: usize,
}

impl<'a> Bounded<'a> {
    /// An identifier: at most [`ID_PREFIX`] characters shown.
    pub fn id(text: &'a str) -> Self {
        Self {
            text,
            prefix: ID_PREFIX,
        }
    }

    /// A message that may quote client input: at most [`MESSAGE_PREFIX`] characters shown.
    pub fn message(text: &'a str) -> Self {
        Self {
            text,
            prefix: MESSAGE_PREFIX,
        }
    }
}

impl fmt::Display for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Redaction looks at no more than the shown prefix plus one key, so its cost is
        // bounded too, whatever the input's length.
        let window = floor_char_boundary(self.text, self.prefix * 4 + 128);
        let redacted = redact_keys(&self.text[..window]);
        let shown: String = redacted.chars().take(self.prefix).collect();
        for c in shown.chars() {
            // Control characters and quotes escaped: one record stays one line.
            write!(f, "{}", c.escape_debug())?;
        }
        if window < self.text.len() || redacted.chars().count() > self.prefix {
            write!(f, "…({} bytes)", self.text.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `s` with every API-key-shaped part cut to its key ID: after `NNSXS.` (any case) at
/// most the ID's 39 alphanumerics are kept, and a following `.` with everything
/// alphanumeric after it becomes `.***`.
pub fn redact_keys(s: &str) -> std::borrow::Cow<'_, str> {
    let marker = format!("{KEY_PREFIX}.");
    // ASCII case changes keep byte offsets.
    let upper = s.to_ascii_uppercase();
    if !upper.contains(&marker) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = 0;
    while let Some(found) = upper[rest..].find(&marker) {
        let id_start = rest + found + marker.len();
        out.push_str(&s[rest..id_start]);
        let bytes = s.as_bytes();
        let mut i = id_start;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
            i += 1;
        }
        let id_end = i.min(id_start + ID_LEN);
        out.push_str(&s[id_start..id_end]);
        let mut cut = i > id_end;
        if i < bytes.len() && bytes[i] == b'.' {
            let mut j = i + 1;
            while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'.') {
                j += 1;
            }
            if j > i + 1 {
                cut = true;
                i = j;
            }
        }
        if cut {
            out.push_str(".***");
        }
        rest = i;
    }
    out.push_str(&s[rest..]);
    std::borrow::Cow::Owned(out)
}

fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut end = at.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// One log line per key per interval, and a count of the lines held back.
pub struct LogLimiter {
    interval: Duration,
    capacity: usize,
    /// Per key: when its last line was let through, and lines held back since.
    seen: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

/// What [`LogLimiter::check`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, and say how many lines from this key were held back before it.
    Log {
        /// Lines held back since the last one logged.
        suppressed: u64,
    },
    /// Hold it back (it is counted).
    Suppress,
}

impl LogLimiter {
    /// At most one line per key per `interval`, remembering at most `capacity` keys (past
    /// that, keys not seen within the interval are forgotten, and if all were, lines from
    /// new keys are held back until some are).
    pub fn new(interval: Duration, capacity: usize) -> Self {
        Self {
            interval,
            capacity,
            seen: Mutex::default(),
        }
    }

    /// Whether a line about `key` may be logged now.
    pub fn check(&self, key: IpAddr) -> Verdict {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: IpAddr, now: Instant) -> Verdict {
        let mut seen = self.seen.lock();
        if let Some((last, held)) = seen.get_mut(&key) {
            if now.duration_since(*last) < self.interval {
                *held += 1;
                return Verdict::Suppress;
            }
            let suppressed = std::mem::take(held);
            *last = now;
            return Verdict::Log { suppressed };
        }
        if seen.len() >= self.capacity {
            let interval = self.interval;
            seen.retain(|_, (last, _)| now.duration_since(*last) < interval);
            if seen.len() >= self.capacity {
                return Verdict::Suppress;
            }
        }
        seen.insert(key, (now, 0));
        Verdict::Log { suppressed: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "NNSXS.ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFG.SECRETSECRETSECRETSECRETSECRETSECRETSECRETSECRETSECR";

    #[test]
    fn keys_are_cut_to_their_id_anywhere_in_any_case() {
        let id = "NNSXS.ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFG";
        assert_eq!(redact_keys(KEY), format!("{id}.***"));
        assert_eq!(
            redact_keys(&format!("invalid username \"{KEY}\": expected")),
            format!("invalid username \"{id}.***\": expected")
        );
        let lower = KEY.to_ascii_lowercase();
        assert!(!redact_keys(&lower).contains("secret"));
        // Mangled: secret glued to the ID, a second dot, two keys.
        let glued = KEY.replacen('.', "", 2).replacen("NNSXS", "NNSXS.", 1);
        assert!(
            !redact_keys(&glued).contains("SECRET"),
            "{}",
            redact_keys(&glued)
        );
        let two = format!("{KEY} and {KEY}.more");
        assert_eq!(redact_keys(&two).matches(".***").count(), 2);
        assert!(!redact_keys(&two).contains("SECRET"));
        assert_eq!(redact_keys("nothing here"), "nothing here");
        assert_eq!(redact_keys("NNSXS."), "NNSXS.");
    }

    #[test]
    fn bounded_shows_a_prefix_and_the_length() {
        let long = "a".repeat(60_000);
        let shown = Bounded::id(&long).to_string();
        assert_eq!(shown, format!("{}…(60000 bytes)", "a".repeat(ID_PREFIX)));
        assert_eq!(Bounded::id("short").to_string(), "short");
        assert_eq!(format!("{:?}", Bounded::id("x")), "\"x\"");
        // Escaped: no line breaks reach the log.
        assert_eq!(Bounded::id("a\nb\"").to_string(), "a\\nb\\\"");
        let many_newlines = "\n".repeat(10_000);
        assert!(Bounded::message(&many_newlines).to_string().len() < 2 * MESSAGE_PREFIX + 32);
        // A key anywhere in a long string is redacted before it is cut.
        let with_key = format!("{KEY}{long}");
        let shown = Bounded::message(&with_key).to_string();
        assert!(
            !shown.contains("SECRET") && shown.contains(".***"),
            "{shown}"
        );
        // Multi-byte characters are never split.
        let wide = "é".repeat(1000);
        assert!(Bounded::id(&wide)
            .to_string()
            .starts_with(&"é".repeat(ID_PREFIX)));
    }

    #[test]
    fn the_limiter_logs_one_line_per_interval_then_the_count() {
        let limiter = LogLimiter::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        assert_eq!(limiter.check_at(a, t0), Verdict::Log { suppressed: 0 });
        for _ in 0..5 {
            assert_eq!(limiter.check_at(a, t0), Verdict::Suppress);
        }
        assert_eq!(limiter.check_at(b, t0), Verdict::Log { suppressed: 0 });
        // Full of recent keys: a new key's lines are held back.
        assert_eq!(limiter.check_at(c, t0), Verdict::Suppress);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(limiter.check_at(a, later), Verdict::Log { suppressed: 5 });
        // Old keys are forgotten to make room.
        assert_eq!(
            limiter.check_at(c, later + Duration::from_secs(11)),
            Verdict::Log { suppressed: 0 }
        );
    }
}
