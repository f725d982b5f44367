//! The Redis [`KeyStore`] of a cluster (DESIGN §3, §7), and the Redis connection that the
//! downlink queue shares ([`connection`], [`run`]).
//!
//! Layout, under the configured prefix (`lorabroker` by default):
//! - `{prefix}:apikey:{id}`: the [`StoredKey`] as a JSON string (never the secret);
//! - `{prefix}:apikeys:{tenant}:{app}`: a set of the application's key IDs, for `list`.
//!
//! Both are written and deleted together atomically. The connection is a redis
//! `ConnectionManager` created lazily: nothing is dialled until the first operation, so a
//! node starts while Redis is down; every operation is bounded by [`OP_TIMEOUT`] and fails
//! with [`StoreError::Unavailable`] while Redis is away; the manager keeps reconnecting in
//! the background and operations succeed again as soon as Redis is back.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, RedisResult, Script};

use super::store::{KeyStore, StoreError, StoredKey, LATEST_EXPIRY};
use crate::topic::AppRef;

/// Upper bound of one store or queue operation, waiting for a connection included: what
/// a caller waits at most while Redis is down.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_millis(1500);
/// One connection attempt (TCP connect and handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One command's reply on an established connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// First reconnection delay; doubles per attempt up to [`RECONNECT_MAX_DELAY`].
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
/// Longest reconnection delay before jitter (the manager adds up to 100 % jitter, so
/// attempts are at most ~1 s apart).
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// A self-healing connection to the Redis at `url`, created without dialling. RESP3 is used
/// unless the URL asks otherwise (`?protocol=resp2`), so that the manager notices a dropped
/// connection at once and reconnects before the next command needs it. Fails only for a
/// URL that cannot be parsed.
pub(crate) fn connection(url: &str) -> Result<ConnectionManager, String> {
    let invalid = |e: redis::RedisError| {
        format!(
            "invalid Redis URL {:?}: {e}",
            crate::config::redact_url(url)
        )
    };
    let mut info = url.into_connection_info().map_err(invalid)?;
    if !url.contains("protocol=") {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        info = info.set_redis_settings(settings);
    }
    let client = redis::Client::open(info).map_err(invalid)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_exponent_base(2.0)
        // Never give up: a failed reconnection would only be retried on the next I/O error.
        .set_number_of_retries(usize::MAX);
    ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)
}

/// Runs one Redis operation within [`OP_TIMEOUT`]; the error says what failed and why.
pub(crate) async fn run<T>(
    what: &str,
    op: impl Future<Output = RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("Redis {what}: {e}")),
        Err(_) => Err(format!("Redis {what}: no answer within {OP_TIMEOUT:?}")),
    }
}

/// Deletes the record `KEYS[1]` and its index entry (`KEYS[2]`, member `ARGV[2]`) only if the
/// record still holds `ARGV[1]`, the value that was read and decoded: 1 if deleted, 0 if the
/// record changed or vanished meanwhile.
const REMOVE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
";

/// How often `remove` re-reads a record that changed under it before giving up.
const REMOVE_ATTEMPTS: usize = 5;

/// API key records in Redis. Clones share one connection.
#[derive(Clone)]
pub struct RedisKeyStore {
    conn: ConnectionManager,
    prefix: String,
    remove_script: Script,
}

impl RedisKeyStore {
    /// A store for the Redis at `url` with keys under `key_prefix` (e.g. `lorabroker`).
    /// Does not dial and does not fail when Redis is down (operations return
    /// [`StoreError::Unavailable`] until it is up); fails only for an unparsable URL.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<RedisKeyStore, StoreError> {
        Ok(RedisKeyStore {
            conn: connection(url).map_err(StoreError::Unavailable)?,
            prefix: key_prefix.to_owned(),
            remove_script: Script::new(REMOVE_SCRIPT),
        })
    }

    /// Takeover epochs on this store's connection, under its prefix.
    pub fn epochs(&self, ttl: Duration) -> super::epoch::RedisEpochs {
        super::epoch::RedisEpochs::new(self.conn.clone(), &self.prefix, ttl)
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}:apikey:{id}", self.prefix)
    }

    fn index_key(&self, tenant: &str, app: &str) -> String {
        format!("{}:apikeys:{tenant}:{app}", self.prefix)
    }

    /// Reads the raw record of `id`.
    async fn read(&self, id: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        run(
            "GET api key",
            redis::cmd("GET")
                .arg(self.record_key(id))
                .query_async(&mut conn),
        )
        .await
        .map_err(StoreError::Unavailable)
    }
}

/// Key IDs are base32 (`[A-Z2-7]`, 39 characters); anything that is not a short run of
/// letters and digits cannot be a key and never reaches a Redis key name.
fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn decode(id: &str, raw: &str) -> Result<StoredKey, StoreError> {
    let key: StoredKey = serde_json::from_str(raw).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    })?;
    if key.id != id {
        return Err(StoreError::Corrupt {
            id: id.to_owned(),
            reason: format!("record holds key ID {:?}", key.id),
        });
    }
    if let Some(at) = key.expires_at.filter(|&at| at > LATEST_EXPIRY) {
        tracing::warn!(
            key_id = id,
            expires_at = at,
            "API key record expires after 9999-12-31; it is treated as never expiring"
        );
    }
    Ok(key)
}

#[async_trait]
impl KeyStore for RedisKeyStore {
    async fn insert(&self, key: &StoredKey) -> Result<(), StoreError> {
        if !plausible_id(&key.id) {
            return Err(StoreError::Corrupt {
                id: key.id.clone(),
                reason: "a key ID is letters and digits only".into(),
            });
        }
        let json = serde_json::to_string(key).map_err(|e| StoreError::Corrupt {
            id: key.id.clone(),
            reason: e.to_string(),
        })?;
        let mut conn = self.conn.clone();
        run(
            "insert api key",
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(self.record_key(&key.id))
                .arg(json)
                .ignore()
                .cmd("SADD")
                .arg(self.index_key(key.tenant.as_str(), key.application.as_str()))
                .arg(&key.id)
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await
        .map_err(StoreError::Unavailable)
    }

    async fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        if !plausible_id(id) {
            return Ok(None);
        }
        self.read(id).await?.map(|raw| decode(id, &raw)).transpose()
    }

    async fn list(&self, app: &AppRef) -> Result<Vec<StoredKey>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = run(
            "list api keys",
            redis::cmd("SMEMBERS")
                .arg(self.index_key(app.tenant.as_str(), app.app.as_str()))
                .query_async(&mut conn),
        )
        .await
        .map_err(StoreError::Unavailable)?;
        let ids: Vec<String> = ids.into_iter().filter(|id| plausible_id(id)).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let records: Vec<Option<String>> = run(
            "read api keys",
            redis::cmd("MGET")
                .arg(ids.iter().map(|id| self.record_key(id)).collect::<Vec<_>>())
                .query_async(&mut conn),
        )
        .await
        .map_err(StoreError::Unavailable)?;
        let mut keys = Vec::with_capacity(ids.len());
        for (id, raw) in ids.iter().zip(records) {
            // An ID whose record is gone was removed between the two reads.
            let Some(raw) = raw else { continue };
            let key = decode(id, &raw)?;
            if key.tenant == app.tenant && key.application == app.app {
                keys.push(key);
            }
        }
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(keys)
    }

    async fn remove(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        if !plausible_id(id) {
            return Ok(None);
        }
        for _ in 0..REMOVE_ATTEMPTS {
            let Some(raw) = self.read(id).await? else {
                return Ok(None);
            };
            // The record names its application, hence its index entry.
            let key = decode(id, &raw)?;
            let mut conn = self.conn.clone();
            let deleted: i64 = run(
                "remove api key",
                self.remove_script
                    .key(self.record_key(id))
                    .key(self.index_key(key.tenant.as_str(), key.application.as_str()))
                    .arg(&raw)
                    .arg(id)
                    .invoke_async(&mut conn),
            )
            .await
            .map_err(StoreError::Unavailable)?;
            if deleted == 1 {
                return Ok(Some(key));
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {id} kept changing while being removed"
        )))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        run("PING", redis::cmd("PING").query_async::<()>(&mut conn))
            .await
            .map_err(StoreError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_cannot_be_keys_never_reach_redis() {
        assert!(plausible_id("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFG"));
        assert!(!plausible_id(""));
        assert!(!plausible_id("a:b"));
        assert!(!plausible_id("a*"));
        assert!(!plausible_id(&"A".repeat(65)));
    }

    #[tokio::test]
    async fn unparsable_url_is_an_error() {
        assert!(RedisKeyStore::connect("not a url", "p").await.is_err());
    }
}
