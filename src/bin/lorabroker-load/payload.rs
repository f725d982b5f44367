//! Message payloads that carry their send time, so that every receiver can measure the
//! latency of each delivery, and the process clock they are measured against.
//!
//! A payload is JSON of a fixed layout, padded to the requested size:
//! `{"k":"m","t":"00000000000001234567","p":"xxxx…"}` where `k` is `m` for a measured
//! message or `w` for a warm-up probe, and `t` the send time in microseconds since the
//! process started (publishers and receivers live in the same process, so one monotonic
//! clock serves both).

use std::sync::OnceLock;
use std::time::Instant;

/// The fixed head of a payload up to the timestamp digits.
const HEAD: &[u8] = br#"{"k":"m","t":""#;
/// Offset of the kind letter.
const KIND_AT: usize = 6;
/// Digits of the timestamp.
const T_DIGITS: usize = 20;
/// The smallest payload this layout can express.
pub const MIN_SIZE: usize = HEAD.len() + T_DIGITS + br#"","p":""}"#.len();

/// Microseconds since the first call in this process (monotonic).
pub fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// What a payload is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Counted and timed.
    Measured,
    /// A warm-up probe: shows that a subscription is live; not counted.
    Warmup,
}

/// A payload of `size` bytes (at least [`MIN_SIZE`]) of `kind`, stamped with `t`.
pub fn build(kind: Kind, t: u64, size: usize) -> Vec<u8> {
    let size = size.max(MIN_SIZE);
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(HEAD);
    out[KIND_AT] = match kind {
        Kind::Measured => b'm',
        Kind::Warmup => b'w',
    };
    out.extend_from_slice(format!("{t:020}").as_bytes());
    out.extend_from_slice(br#"","p":""#);
    out.resize(size - 2, b'x');
    out.extend_from_slice(br#""}"#);
    out
}

/// Rewrites the send time of a payload built by [`build`] in place.
pub fn stamp(payload: &mut [u8], t: u64) {
    let digits = &mut payload[HEAD.len()..HEAD.len() + T_DIGITS];
    let mut t = t;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (t % 10) as u8;
        t /= 10;
    }
}

/// The kind and send time of a payload built by [`build`]; `None` for anything else.
pub fn parse(payload: &[u8]) -> Option<(Kind, u64)> {
    if payload.len() < MIN_SIZE || payload[..KIND_AT] != HEAD[..KIND_AT] {
        return None;
    }
    let kind = match payload[KIND_AT] {
        b'm' => Kind::Measured,
        b'w' => Kind::Warmup,
        _ => return None,
    };
    let digits = &payload[HEAD.len()..HEAD.len() + T_DIGITS];
    let mut t = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        t = t * 10 + u64::from(d - b'0');
    }
    Some((kind, t))
}

/// The send time carried in a correlation ID `lbload:<t>` anywhere in `doc` (used for the
/// downlink scenario, whose events are documents written by the broker).
pub fn find_correlation_time(doc: &[u8]) -> Option<u64> {
    const TAG: &[u8] = b"lbload:";
    let at = doc.windows(TAG.len()).position(|w| w == TAG)? + TAG.len();
    let digits: Vec<u8> = doc[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_are_json_of_the_asked_size() {
        for size in [0, MIN_SIZE, 200, 1000] {
            let p = build(Kind::Warmup, 1234567, size);
            assert_eq!(p.len(), size.max(MIN_SIZE));
            assert_eq!(parse(&p), Some((Kind::Warmup, 1234567)));
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["k"], "w");
        }
        let mut p = build(Kind::Measured, 5, 200);
        stamp(&mut p, 98765);
        assert_eq!(parse(&p), Some((Kind::Measured, 98765)));
        assert_eq!(parse(b"{}"), None);
    }

    #[test]
    fn correlation_times_are_found_in_documents() {
        let doc = br#"{"correlation_ids":["lbload:000042","as:downlink:01H"]}"#;
        assert_eq!(find_correlation_time(doc), Some(42));
        assert_eq!(find_correlation_time(b"{}"), None);
    }
}
