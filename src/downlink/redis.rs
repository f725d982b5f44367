//! The Redis [`DownlinkQueue`] of a cluster (DESIGN §5, §7).
//!
//! Layout, under the configured prefix (`lorabroker` by default), every key of a tenant
//! behind the Redis Cluster hash tag `{t:<tenant>}` ([`tenant_scope`]), so that one script
//! only ever touches one slot:
//! - `{prefix}:{t:<tenant>}:down:<app>:<dev>`: the device's queue, a list, oldest item
//!   first, with a TTL of `downlink.queue_idle_expiry` set on every write;
//! - `{prefix}:{t:<tenant>}:quota`: a hash of byte counters: `tenant`, `app:<app>` and
//!   `dev:<app>:<dev>`;
//! - `{prefix}:{t:<tenant>}:queues`: a sorted set of the queues (`<app>:<dev>`) by
//!   deadline (Unix ms), so that expired queues can leave the counters.
//!
//! Push, replace, pop ("take next downlink") and usage are each one Lua script
//! (`src/downlink/lua/`), so every check and every counter move happens in the same atomic
//! step as the write: concurrent pushes from several nodes can never take a queue past a
//! limit or a counter away from the bytes really queued. Expiry: Redis deletes an idle
//! list at its deadline; the next script run in that tenant gives the list's bytes back
//! (up to 64 expired queues per run, one second after the deadline), and a script on the
//! expired device itself does so at once. The counters of a tenant that writes nothing
//! more keep the bytes of its expired queues until its quota hash expires too, a minute
//! after its last queue: they never stay inflated for a tenant that is still writing.
//!
//! The connection is a [`RedisConn`] in any mode (standalone, Sentinel, Cluster): created
//! without dialling, bounded per operation, reconnecting in the background.

use async_trait::async_trait;
use redis::Script;

use super::queue::{DownlinkQueue, QueueError, QueueLimits, QueueUsage};
use crate::auth::redis::{connection, run};
use crate::redis_conn::RedisConn;
use crate::topic::{DeviceRef, Id};

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// `{prefix}:{t:<tenant>}`: the start of every key of `tenant`, carrying its Redis Cluster
/// hash tag.
pub fn tenant_scope(prefix: &str, tenant: &Id) -> String {
    format!("{prefix}:{{t:{tenant}}}")
}

/// `{prefix}:{t:<tenant>}:down:<app>:<dev>`: the list of `device`'s queue.
pub fn list_key(prefix: &str, device: &DeviceRef) -> String {
    format!(
        "{}:down:{}:{}",
        tenant_scope(prefix, &device.app.tenant),
        device.app.app,
        device.device
    )
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// Per-device downlink queues in Redis. Clones share one connection.
#[derive(Clone)]
pub struct RedisDownlinkQueue {
    conn: RedisConn,
    prefix: String,
    limits: QueueLimits,
    push: Script,
    replace: Script,
    pop: Script,
    usage: Script,
}

impl RedisDownlinkQueue {
    /// Queues in the Redis at `url` under `key_prefix` (e.g. `lorabroker`), holding at most
    /// `capacity` items per device, with the default byte limits. See
    /// [`RedisDownlinkQueue::connect_with`].
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        capacity: usize,
    ) -> Result<RedisDownlinkQueue, QueueError> {
        Self::connect_with(url, key_prefix, QueueLimits::with_capacity(capacity)).await
    }

    /// Queues in the Redis at `url` under `key_prefix`, enforcing `limits`. Does not dial
    /// and does not fail when Redis is down (operations return [`QueueError::Unavailable`]
    /// until it is up); fails only for an unparsable URL.
    pub async fn connect_with(
        url: &str,
        key_prefix: &str,
        limits: QueueLimits,
    ) -> Result<RedisDownlinkQueue, QueueError> {
        Ok(Self::new(
            connection(url).map_err(QueueError::Unavailable)?,
            key_prefix,
            limits,
        ))
    }

    /// Queues on `conn` (any [`RedisConn`] mode) under `key_prefix`, enforcing `limits`.
    pub fn new(conn: RedisConn, key_prefix: &str, limits: QueueLimits) -> RedisDownlinkQueue {
        RedisDownlinkQueue {
            conn,
            prefix: key_prefix.to_owned(),
            limits,
            push: script(include_str!("lua/push.lua")),
            replace: script(include_str!("lua/replace.lua")),
            pop: script(include_str!("lua/pop.lua")),
            usage: script(include_str!("lua/usage.lua")),
        }
    }

    /// The name of `device`'s list: `{prefix}:{t:<tenant>}:down:<app>:<dev>`.
    pub fn list_key(&self, device: &DeviceRef) -> String {
        list_key(&self.prefix, device)
    }

    /// A script invocation with the device's keys and its first two arguments.
    fn invocation<'a>(
        &self,
        script: &'a Script,
        device: &DeviceRef,
    ) -> redis::ScriptInvocation<'a> {
        let scope = tenant_scope(&self.prefix, &device.app.tenant);
        let mut inv = script.prepare_invoke();
        inv.key(self.list_key(device))
            .key(format!("{scope}:quota"))
            .key(format!("{scope}:queues"))
            .arg(device.app.app.as_str())
            .arg(format!("{}:{}", device.app.app, device.device));
        inv
    }

    /// A push or replace: the script's reply turned into the new length or the limit hit.
    async fn write(
        &self,
        what: &str,
        script: &Script,
        device: &DeviceRef,
        items: &[String],
    ) -> Result<usize, QueueError> {
        let mut inv = self.invocation(script, device);
        inv.arg(self.limits.capacity)
            .arg(self.limits.device_bytes)
            .arg(self.limits.application_bytes)
            .arg(self.limits.tenant_bytes)
            .arg(u64::try_from(self.limits.idle_expiry.as_millis()).unwrap_or(u64::MAX))
            .arg(items);
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = run(what, inv.invoke_async(&mut conn))
            .await
            .map_err(QueueError::Unavailable)?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        let l = &self.limits;
        match reply.first().copied() {
            Some(0) => Ok(at(1) as usize),
            Some(1) => Err(QueueError::Full {
                queued: at(1) as usize,
                adding: at(2) as usize,
                capacity: l.capacity,
            }),
            Some(2) => Err(QueueError::DeviceBytes {
                queued: at(1),
                adding: at(2),
                limit: l.device_bytes,
            }),
            Some(3) => Err(QueueError::ApplicationQuota {
                queued: at(1),
                adding: at(2),
                limit: l.application_bytes,
            }),
            Some(4) => Err(QueueError::TenantQuota {
                queued: at(1),
                adding: at(2),
                limit: l.tenant_bytes,
            }),
            other => Err(QueueError::Unavailable(format!(
                "Redis {what}: unexpected script reply {other:?}"
            ))),
        }
    }
}

#[async_trait]
impl DownlinkQueue for RedisDownlinkQueue {
    async fn push(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        self.write("push downlinks", &self.push, device, items)
            .await
    }

    async fn replace(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        if items.len() > self.limits.capacity {
            // Not worth sending to Redis.
            return Err(QueueError::Full {
                queued: 0,
                adding: items.len(),
                capacity: self.limits.capacity,
            });
        }
        self.write("replace downlinks", &self.replace, device, items)
            .await
    }

    async fn pop(&self, device: &DeviceRef) -> Result<Option<String>, QueueError> {
        let inv = self.invocation(&self.pop, device);
        let mut conn = self.conn.clone();
        run("take next downlink", inv.invoke_async(&mut conn))
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

    async fn usage(&self, device: &DeviceRef) -> Result<QueueUsage, QueueError> {
        let inv = self.invocation(&self.usage, device);
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = run("downlink usage", inv.invoke_async(&mut conn))
            .await
            .map_err(QueueError::Unavailable)?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(QueueUsage {
            items: at(0) as usize,
            device_bytes: at(1),
            application_bytes: at(2),
            tenant_bytes: at(3),
        })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        run("PING", redis::cmd("PING").query_async::<()>(&mut conn))
            .await
            .map_err(QueueError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::AppRef;

    #[test]
    fn keys_of_a_tenant_share_its_hash_tag() {
        let t = Id::parse("tenant1").unwrap();
        assert_eq!(tenant_scope("lorabroker", &t), "lorabroker:{t:tenant1}");
        let device = DeviceRef::new(
            AppRef::new(t, Id::parse("app1").unwrap()),
            Id::parse("dev1").unwrap(),
        );
        assert_eq!(list_key("lb", &device), "lb:{t:tenant1}:down:app1:dev1");
    }
}
