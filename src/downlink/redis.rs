//! The Redis [`DownlinkQueue`] of a cluster (DESIGN §5, §7): one Redis list per device,
//! `{prefix}:down:{tenant}:{app}:{dev}`, oldest item first.
//!
//! Push and replace are each one Lua script, so the capacity check and the write are a
//! single atomic step: either every item is stored or none is, and concurrent pushes from
//! several nodes can never take a queue past its capacity. The connection is the one of
//! the key store ([`crate::auth::redis::connection`]): created without dialling, bounded
//! per operation, reconnecting in the background.

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::Script;

use super::queue::{DownlinkQueue, QueueError};
use crate::auth::redis::{connection, run};
use crate::topic::DeviceRef;

/// Items per RPUSH inside the scripts: Lua's `unpack` is limited by its C stack (~8000
/// values), and a queue may be 10000 long.
const PUSH_CHUNK: usize = 1000;

/// `KEYS[1]` the list, `ARGV[1]` the capacity, `ARGV[2..]` the items. Returns
/// `{1, new length}` when stored, `{0, current length}` when it would not fit.
fn push_script() -> String {
    format!(
        r"
local n = redis.call('LLEN', KEYS[1])
local adding = #ARGV - 1
if n + adding > tonumber(ARGV[1]) then
  return {{0, n}}
end
for i = 2, #ARGV, {PUSH_CHUNK} do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + {last}, #ARGV)))
end
return {{1, n + adding}}
",
        last = PUSH_CHUNK - 1
    )
}

/// `KEYS[1]` the list, `ARGV[1]` the capacity, `ARGV[2..]` the items (none clears). Returns
/// the new length, or -1 when the items alone exceed the capacity (nothing changed).
fn replace_script() -> String {
    format!(
        r"
local adding = #ARGV - 1
if adding > tonumber(ARGV[1]) then
  return -1
end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, {PUSH_CHUNK} do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + {last}, #ARGV)))
end
return adding
",
        last = PUSH_CHUNK - 1
    )
}

/// Per-device downlink queues in Redis. Clones share one connection.
#[derive(Clone)]
pub struct RedisDownlinkQueue {
    conn: ConnectionManager,
    prefix: String,
    capacity: usize,
    push: Script,
    replace: Script,
}

impl RedisDownlinkQueue {
    /// Queues in the Redis at `url` under `key_prefix` (e.g. `lorabroker`), holding at most
    /// `capacity` items per device. Does not dial and does not fail when Redis is down
    /// (operations return [`QueueError::Unavailable`] until it is up); fails only for an
    /// unparsable URL.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        capacity: usize,
    ) -> Result<RedisDownlinkQueue, QueueError> {
        Ok(RedisDownlinkQueue {
            conn: connection(url).map_err(QueueError::Unavailable)?,
            prefix: key_prefix.to_owned(),
            capacity,
            push: Script::new(&push_script()),
            replace: Script::new(&replace_script()),
        })
    }

    fn list_key(&self, device: &DeviceRef) -> String {
        format!(
            "{}:down:{}:{}:{}",
            self.prefix, device.app.tenant, device.app.app, device.device
        )
    }

    fn full(&self, queued: usize, adding: usize) -> QueueError {
        QueueError::Full {
            queued,
            adding,
            capacity: self.capacity,
        }
    }
}

/// A length reported by a script (never negative there).
fn length(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

#[async_trait]
impl DownlinkQueue for RedisDownlinkQueue {
    async fn push(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        let (stored, len): (i64, i64) = run(
            "push downlinks",
            self.push
                .key(self.list_key(device))
                .arg(self.capacity)
                .arg(items)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(QueueError::Unavailable)?;
        if stored == 1 {
            Ok(length(len))
        } else {
            Err(self.full(length(len), items.len()))
        }
    }

    async fn replace(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        if items.len() > self.capacity {
            return Err(self.full(0, items.len()));
        }
        let mut conn = self.conn.clone();
        let len: i64 = run(
            "replace downlinks",
            self.replace
                .key(self.list_key(device))
                .arg(self.capacity)
                .arg(items)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(QueueError::Unavailable)?;
        if len < 0 {
            return Err(self.full(0, items.len()));
        }
        Ok(length(len))
    }

    async fn pop(&self, device: &DeviceRef) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn.clone();
        run(
            "pop downlink",
            redis::cmd("LPOP")
                .arg(self.list_key(device))
                .query_async(&mut conn),
        )
        .await
        .map_err(QueueError::Unavailable)
    }

    async fn list(&self, device: &DeviceRef) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        run(
            "list downlinks",
            redis::cmd("LRANGE")
                .arg(self.list_key(device))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn),
        )
        .await
        .map_err(QueueError::Unavailable)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        run("PING", redis::cmd("PING").query_async::<()>(&mut conn))
            .await
            .map_err(QueueError::Unavailable)
    }
}
