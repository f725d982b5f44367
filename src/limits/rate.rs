//! Keyed GCRA rate limiters ([`KeyedRate`]) over `governor`, with bounded memory: keys whose
//! state is back to "fresh" are forgotten by [`KeyedRate::sweep`] (on a timer) and at once
//! when a limiter holds more than its key bound.
//!
//! Time comes from tokio's clock ([`TokioClock`]), so the limiters follow
//! `tokio::time::pause()` in tests like every other timer of the node.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::config::Rate;

/// governor's clock read from tokio's (paused in tests, real otherwise).
#[derive(Clone, Debug)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

type Limiter<K> = RateLimiter<K, DashMapStateStore<K>, TokioClock, NoOpMiddleware<Nanos>>;

/// A rate limit per key; off (everything allowed, nothing stored) when its [`Rate`] is.
pub struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: Option<Limiter<K>>,
    max_keys: usize,
}

/// The governor quota of an enabled `rate`.
fn quota(rate: Rate) -> Option<Quota> {
    if !rate.is_on() {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / rate.per_second).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Some(Quota::with_period(period)?.allow_burst(burst))
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    /// A limiter of `rate` per key that remembers at most about `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            limiter: quota(rate).map(|q| RateLimiter::dashmap_with_clock(q, TokioClock::default())),
            max_keys,
        }
    }

    /// Whether the limit is on.
    pub fn is_on(&self) -> bool {
        self.limiter.is_some()
    }

    /// Takes one cell for `key`: `true` when within the limit (or the limit is off).
    pub fn check(&self, key: &K) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let allowed = limiter.check_key(key).is_ok();
        if limiter.len() > self.max_keys {
            // Keys arrive faster than the sweep forgets them (many source addresses):
            // forget the idle ones now. Keys that are still limited are kept, so the bound
            // is on idle memory, not on enforcement.
            limiter.retain_recent();
        }
        allowed
    }

    /// Forgets keys whose state is indistinguishable from a fresh one.
    pub fn sweep(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of a source address for per-IP limits: the address itself for IPv4, its /64
/// for IPv6 (one host usually holds a whole /64, and could otherwise rotate through it).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_the_burst_then_the_rate() {
        let rate = KeyedRate::new(Rate::new(2.0, 3), 100);
        let k = "key".to_owned();
        assert!((0..3).all(|_| rate.check(&k)), "the burst passes");
        assert!(!rate.check(&k), "one more is limited");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!rate.check(&k), "not yet replenished");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(rate.check(&k), "one cell every 500 ms");
        assert!(!rate.check(&k));
        assert!(rate.check(&"other".to_owned()), "keys are independent");
    }

    #[tokio::test(start_paused = true)]
    async fn off_allows_everything_and_stores_nothing() {
        let rate = KeyedRate::new(Rate::OFF, 100);
        assert!(!rate.is_on());
        assert!((0..10_000).all(|i| rate.check(&i)));
        assert!(rate.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_forgotten_and_memory_is_bounded() {
        let rate = KeyedRate::new(Rate::new(10.0, 1), 1000);
        for i in 0..900u32 {
            assert!(rate.check(&i));
        }
        assert_eq!(rate.len(), 900);
        tokio::time::advance(Duration::from_secs(1)).await;
        rate.sweep();
        assert!(rate.is_empty(), "replenished keys are forgotten");
        // Many more keys than the bound, each used once: the limiter never holds much more
        // than its bound of them.
        for i in 0..20_000u32 {
            rate.check(&i);
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(rate.len() <= 1001, "{} keys held", rate.len());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rates_work() {
        let rate = KeyedRate::new(Rate::new(0.1, 1), 10);
        assert!(rate.check(&1));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!rate.check(&1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(rate.check(&1));
    }

    #[test]
    fn ipv6_is_limited_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(ip_key(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ip_key(mapped), v4);
    }
}
