//! The Redis [`DeviceRegistry`] of a cluster: one set per application,
//! `{prefix}:{t:<tenant>}:devices:<app>`, whose members are device IDs (documented for the
//! upstream in `docs/upstream.md`, "Device registry"). The key carries the tenant's Redis
//! Cluster hash tag, like the downlink queues.

use async_trait::async_trait;

use super::{DeviceRegistry, RegistryError};
use crate::auth::redis::{connection, run};
use crate::downlink::redis::tenant_scope;
use crate::redis_conn::RedisConn;
use crate::topic::{AppRef, DeviceRef, Id};

/// Members read per SSCAN call when listing, so that a large application never blocks
/// Redis with one big reply.
const SCAN_COUNT: usize = 1000;

/// `{prefix}:{t:<tenant>}:devices:<app>`: the set of `app`'s registered devices.
pub fn devices_key(prefix: &str, app: &AppRef) -> String {
    format!("{}:devices:{}", tenant_scope(prefix, &app.tenant), app.app)
}

/// Registered devices in Redis. Clones share one connection.
#[derive(Clone)]
pub struct RedisDeviceRegistry {
    conn: RedisConn,
    prefix: String,
}

impl RedisDeviceRegistry {
    /// The registry in the Redis at `url` under `key_prefix`. Does not dial and does not
    /// fail when Redis is down (operations fail until it is up); fails only for an
    /// unparsable URL.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, RegistryError> {
        Ok(Self::new(
            connection(url).map_err(RegistryError::Unavailable)?,
            key_prefix,
        ))
    }

    /// The registry on `conn` (any [`RedisConn`] mode) under `key_prefix`.
    pub fn new(conn: RedisConn, key_prefix: &str) -> Self {
        Self {
            conn,
            prefix: key_prefix.to_owned(),
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, RegistryError> {
        let mut conn = self.conn.clone();
        run(what, cmd.query_async(&mut conn))
            .await
            .map_err(RegistryError::Unavailable)
    }
}

#[async_trait]
impl DeviceRegistry for RedisDeviceRegistry {
    async fn add(&self, device: &DeviceRef) -> Result<bool, RegistryError> {
        let n: i64 = self
            .query(
                "register device",
                redis::cmd("SADD")
                    .arg(devices_key(&self.prefix, &device.app))
                    .arg(device.device.as_str()),
            )
            .await?;
        Ok(n == 1)
    }

    async fn remove(&self, device: &DeviceRef) -> Result<bool, RegistryError> {
        let n: i64 = self
            .query(
                "unregister device",
                redis::cmd("SREM")
                    .arg(devices_key(&self.prefix, &device.app))
                    .arg(device.device.as_str()),
            )
            .await?;
        Ok(n == 1)
    }

    async fn contains(&self, device: &DeviceRef) -> Result<bool, RegistryError> {
        self.query(
            "look up device",
            redis::cmd("SISMEMBER")
                .arg(devices_key(&self.prefix, &device.app))
                .arg(device.device.as_str()),
        )
        .await
    }

    async fn list(&self, app: &AppRef) -> Result<Vec<Id>, RegistryError> {
        let key = devices_key(&self.prefix, app);
        let mut devices = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, members): (u64, Vec<String>) = self
                .query(
                    "list devices",
                    redis::cmd("SSCAN")
                        .arg(&key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(SCAN_COUNT),
                )
                .await?;
            for m in members {
                match Id::parse(&m) {
                    Ok(id) => devices.push(id),
                    // Written by something else: never a reason to fail the whole list.
                    Err(_) => tracing::warn!(
                        key = %key,
                        member = %crate::downlink::error::quoted(&m),
                        "device registry member is not a valid device ID"
                    ),
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        devices.sort();
        devices.dedup(); // SSCAN may return a member twice
        Ok(devices)
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        self.query::<()>("PING", &redis::cmd("PING")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_carries_the_tenant_hash_tag() {
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        assert_eq!(devices_key("lb", &app), "lb:{t:tenant1}:devices:app1");
    }
}
