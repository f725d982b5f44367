//! [`ClientEpochs`]: a number per CONNECT that orders the connections of one client ID
//! across the cluster without trusting any node's clock (DESIGN §4, takeover).
//!
//! Of two connections with the same client ID in the same application, the one with the
//! greater epoch survives, on whichever nodes they live (see [`crate::registry`]). The
//! embedded node counts in memory ([`MemoryEpochs`]); a cluster asks Redis
//! ([`RedisEpochs`]), one script per CONNECT on the key
//! `{prefix}:epoch:{tenant}:{app}:{hash of the client ID}`:
//!
//! - `INCR` gives a total order: of two CONNECTs, the one whose script ran later at Redis
//!   gets the greater epoch, whatever the nodes' clocks say;
//! - the key expires `ttl` after the last CONNECT (`redis.takeover_epoch_ttl`), so that
//!   client IDs seen once cost nothing for long. A counter created anew starts at Redis's
//!   own clock in microseconds rather than at 1, so that it stays above every epoch of the
//!   expired one (which only ever grew by one per CONNECT) and a connection older than the
//!   TTL still loses to a new one. Redis's clock is trusted only there, never to break a tie.
//!
//! One key per script, hence no hash tag is needed on Redis Cluster. While Redis cannot be
//! reached, [`RedisEpochs::next`] fails fast for a second after each failure, so that
//! logins of cached keys are not slowed by an outage; such connections have no epoch and
//! fall back to the connect-time order of old (see [`crate::registry`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use data_encoding::HEXLOWER;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::redis::run;
use super::store::StoreError;
use crate::redis_conn::RedisConn;
use crate::topic::AppRef;

/// Hands out takeover epochs. Implementations: [`MemoryEpochs`], [`RedisEpochs`].
#[async_trait]
pub trait ClientEpochs: Send + Sync + 'static {
    /// An epoch for a new connection of `client_id` in `app`: greater than every epoch
    /// handed out for it before.
    async fn next(&self, app: &AppRef, client_id: &str) -> Result<u64, StoreError>;
}

/// One counter for every client ID of an embedded node: a total order, hence one per
/// client ID too.
#[derive(Default)]
pub struct MemoryEpochs {
    last: AtomicU64,
}

impl MemoryEpochs {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl ClientEpochs for MemoryEpochs {
    async fn next(&self, _: &AppRef, _: &str) -> Result<u64, StoreError> {
        Ok(self.last.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// Increments `KEYS[1]`; a new counter starts at Redis's clock in microseconds; the key
/// expires `ARGV[1]` milliseconds later. Returns the epoch.
const EPOCH_SCRIPT: &str = r"
local epoch = redis.call('INCR', KEYS[1])
if epoch == 1 then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[1], now[1] .. string.format('%06d', tonumber(now[2])))
  epoch = redis.call('INCR', KEYS[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return epoch
";

/// How long epochs fail without asking Redis after a failure.
const BACKOFF: Duration = Duration::from_secs(1);

/// Takeover epochs in Redis (see the module documentation).
pub struct RedisEpochs {
    conn: RedisConn,
    prefix: String,
    ttl_ms: u64,
    /// Until when epochs fail without asking Redis, after a failure.
    failing_until: Mutex<Option<Instant>>,
}

impl RedisEpochs {
    /// Epochs on the connection `conn`, under `prefix`, expiring `ttl` after their last use.
    pub(crate) fn new(conn: RedisConn, prefix: &str, ttl: Duration) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            failing_until: Mutex::new(None),
        }
    }

    /// The counter's key: the client ID is hashed, as it may be long and hold any byte.
    fn key(&self, app: &AppRef, client_id: &str) -> String {
        let hash = Sha256::digest(client_id.as_bytes());
        format!(
            "{}:epoch:{}:{}:{}",
            self.prefix,
            app.tenant,
            app.app,
            HEXLOWER.encode(&hash[..16])
        )
    }
}

#[async_trait]
impl ClientEpochs for RedisEpochs {
    async fn next(&self, app: &AppRef, client_id: &str) -> Result<u64, StoreError> {
        if self
            .failing_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
        {
            return Err(StoreError::Unavailable(
                "Redis failed less than a second ago".into(),
            ));
        }
        let mut conn = self.conn.clone();
        // EVAL rather than EVALSHA: one round trip even on a connection that has not seen
        // the script (a slow Redis would otherwise pay three).
        let epoch = run(
            "takeover epoch",
            redis::cmd("EVAL")
                .arg(EPOCH_SCRIPT)
                .arg(1)
                .arg(self.key(app, client_id))
                .arg(self.ttl_ms)
                .query_async::<u64>(&mut conn),
        )
        .await;
        *self.failing_until.lock() = epoch.is_err().then(|| Instant::now() + BACKOFF);
        epoch.map_err(StoreError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    #[tokio::test]
    async fn memory_epochs_only_grow() {
        let epochs = MemoryEpochs::new();
        let a = epochs.next(&app(), "c1").await.unwrap();
        let b = epochs.next(&app(), "c1").await.unwrap();
        let c = epochs.next(&app(), "c2").await.unwrap();
        assert!(0 < a && a < b && b < c);
    }

    #[tokio::test]
    async fn redis_epoch_keys_are_bounded_and_keep_tenants_apart() {
        let conn = super::super::redis::connection("redis://127.0.0.1:1").unwrap();
        let epochs = RedisEpochs::new(conn, "lb", Duration::from_secs(60));
        let long = "x".repeat(60_000);
        let key = epochs.key(&app(), &long);
        assert!(key.starts_with("lb:epoch:tenant1:app1:"), "{key}");
        assert_eq!(key.len(), "lb:epoch:tenant1:app1:".len() + 32);
        let other = AppRef::new(Id::parse("tenant2").unwrap(), Id::parse("app1").unwrap());
        assert_ne!(epochs.key(&other, "c"), epochs.key(&app(), "c"));
        assert_ne!(epochs.key(&app(), "c"), epochs.key(&app(), "d"));
    }
}
