//! The Redis [`KeyStore`] of a cluster (DESIGN §3, §7), and what every Redis store shares:
//! the standalone [`connection`] of a URL and the bounded [`run`].
//!
//! Layout, under the configured prefix (`lorabroker` by default):
//! - `{prefix}:apikey:{id}`: the [`StoredKey`] as a JSON string (never the secret);
//! - `{prefix}:apikeys:{tenant}:{app}`: a set of the application's key IDs, for `list`.
//!
//! The two keys hash to different Redis Cluster slots, so no command or script touches
//! both: an insert adds the ID to the index first and then writes the record, a removal
//! deletes the record (only if it is still the one read) and then the index entry. In
//! between, and after a failure between the two steps, the index may name an ID without a
//! record, which `list` skips; a record is never left out of its index. The connection is
//! a [`RedisConn`] in any mode, created without dialling, so a node starts while Redis is
//! down; every operation is bounded by [`OP_TIMEOUT`] and fails with
//! [`StoreError::Unavailable`] while Redis is away, and succeeds again once it is back.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisResult, Script};

use super::store::{KeyStore, StoreError, StoredKey, LATEST_EXPIRY};
use crate::redis_conn::RedisConn;
use crate::topic::AppRef;

/// Upper bound of one store or queue operation, waiting for a connection included: what
/// a caller waits at most while Redis is down.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_millis(1500);
/// A standalone connection to `url`, created without dialling (see [`RedisConn`]); fails
/// only for a URL that cannot be parsed.
pub(crate) fn connection(url: &str) -> Result<RedisConn, String> {
    RedisConn::from_url(url).map_err(|e| e.to_string())
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

/// Deletes the record `KEYS[1]` only if it still holds `ARGV[1]`, the value that was read
/// and decoded: 1 if deleted, 0 if the record changed or vanished meanwhile. One key, so
/// that it runs on Redis Cluster; the index entry goes right after.
const REMOVE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
";

/// How often `remove` re-reads a record that changed under it before giving up.
const REMOVE_ATTEMPTS: usize = 5;

/// API key records in Redis. Clones share one connection.
#[derive(Clone)]
pub struct RedisKeyStore {
    conn: RedisConn,
    prefix: String,
    remove_script: Script,
}

impl RedisKeyStore {
    /// A store for the Redis at `url` with keys under `key_prefix` (e.g. `lorabroker`).
    /// Does not dial and does not fail when Redis is down (operations return
    /// [`StoreError::Unavailable`] until it is up); fails only for an unparsable URL.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<RedisKeyStore, StoreError> {
        Ok(Self::new(
            connection(url).map_err(StoreError::Unavailable)?,
            key_prefix,
        ))
    }

    /// A store on `conn` (any [`RedisConn`] mode) with keys under `key_prefix`.
    pub fn new(conn: RedisConn, key_prefix: &str) -> RedisKeyStore {
        RedisKeyStore {
            conn,
            prefix: key_prefix.to_owned(),
            remove_script: Script::new(REMOVE_SCRIPT),
        }
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
        // Index first: a failure before the record leaves only an ID that `list` skips.
        run::<()>(
            "index api key",
            redis::cmd("SADD")
                .arg(self.index_key(key.tenant.as_str(), key.application.as_str()))
                .arg(&key.id)
                .query_async(&mut conn),
        )
        .await
        .map_err(StoreError::Unavailable)?;
        run::<()>(
            "insert api key",
            redis::cmd("SET")
                .arg(self.record_key(&key.id))
                .arg(json)
                .query_async(&mut conn),
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
                    .arg(&raw)
                    .invoke_async(&mut conn),
            )
            .await
            .map_err(StoreError::Unavailable)?;
            if deleted == 1 {
                // The key is revoked now; a failure here leaves an ID that `list` skips.
                let unindexed = run::<()>(
                    "unindex api key",
                    redis::cmd("SREM")
                        .arg(self.index_key(key.tenant.as_str(), key.application.as_str()))
                        .arg(id)
                        .query_async(&mut conn),
                )
                .await;
                if let Err(e) = unindexed {
                    tracing::warn!(key_id = id, error = %e, "API key removed but still listed in its index");
                }
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
