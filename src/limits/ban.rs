//! The flapping ban (EMQX's name for it): a source IP whose logins keep failing is refused
//! for a cool-down without asking the key store, so that random key IDs from one client
//! cannot become Redis load.
//!
//! Failures are counted by a [`KeyedRate`]; the failure over the rate starts the ban. Bans
//! are held in a bounded moka cache whose entries expire with the cool-down; the decision
//! itself reads tokio's clock, so tests run it under `tokio::time::pause()`.

use std::net::IpAddr;
use std::time::Duration;

use moka::future::Cache;
use tokio::time::Instant;

use super::config::Rate;
use super::rate::{ip_key, KeyedRate};

/// Failed logins per source IP and the bans they earned.
pub struct FlappingBan {
    failures: KeyedRate<IpAddr>,
    banned: Cache<IpAddr, Instant>,
    cooldown: Duration,
}

impl FlappingBan {
    /// Bans an IP for `cooldown` once its failures exceed `rate`; remembers at most
    /// `max_keys` IPs.
    pub fn new(rate: Rate, cooldown: Duration, max_keys: usize) -> Self {
        Self {
            failures: KeyedRate::new(rate, max_keys),
            banned: Cache::builder()
                .max_capacity(max_keys as u64)
                // Memory only: the decision compares the stored instant with tokio's clock.
                .time_to_live(cooldown + Duration::from_secs(1))
                .build(),
            cooldown,
        }
    }

    /// Whether `ip` is banned now.
    pub async fn is_banned(&self, ip: IpAddr) -> bool {
        if !self.failures.is_on() {
            return false;
        }
        match self.banned.get(&ip_key(ip)).await {
            Some(until) => Instant::now() < until,
            None => false,
        }
    }

    /// Counts a failed login from `ip`; `true` when this failure starts a ban.
    pub async fn failed(&self, ip: IpAddr) -> bool {
        let key = ip_key(ip);
        if self.failures.check(&key) {
            return false;
        }
        self.banned
            .insert(key, Instant::now() + self.cooldown)
            .await;
        true
    }

    /// Forgets idle failure counts.
    pub fn sweep(&self) {
        self.failures.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_over_the_rate_ban_for_the_cooldown() {
        let ban = FlappingBan::new(Rate::new(1.0, 3), Duration::from_secs(30), 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(!ban.failed(ip).await, "within the burst");
            assert!(!ban.is_banned(ip).await);
        }
        assert!(
            ban.failed(ip).await,
            "the fourth failure at once starts a ban"
        );
        assert!(ban.is_banned(ip).await);
        assert!(
            !ban.is_banned(other).await,
            "other addresses are not banned"
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(ban.is_banned(ip).await, "still in the cooldown");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!ban.is_banned(ip).await, "the cooldown is over");
        assert!(
            !ban.failed(ip).await,
            "and the failures replenished meanwhile"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn off_never_bans() {
        let ban = FlappingBan::new(Rate::OFF, Duration::from_secs(30), 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..1000 {
            assert!(!ban.failed(ip).await);
        }
        assert!(!ban.is_banned(ip).await);
    }
}
