//! The Redis [`QuotaStore`]: connection counts across the cluster with per-node leases.
//! It lives in `auth/` because admission is authentication's neighbour and because only
//! `auth/` and `downlink/` talk to Redis; the trait and the policy are in `limits/`.
//!
//! Layout, under the configured prefix: one hash per scope,
//! `{prefix}:conns:{<tenant>}:tenant`, `…:app:<app>`, `…:key:<key id>` (the tenant in a Redis
//! Cluster hash tag, so one CONNECT's scopes share a slot), field = node instance, value =
//! `<count>:<lease expiry, Redis ms>`. The acquire script sums the fields whose lease is
//! alive (deleting the dead ones) and takes one connection in every scope only if none is
//! full. Each node renews its fields every `limits.quota_refresh_interval` with its own
//! exact counts; a node that dies stops renewing, and its connections stop counting when its
//! lease (`limits.quota_lease`) expires. Counts are thus exact while nodes live and
//! approximate for at most one lease after a node dies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::redis::{connection, run};
use crate::limits::{QuotaError, QuotaStore, Scope, ScopeKind};
use crate::redis_conn::RedisConn;

/// `KEYS`: scope hashes; `ARGV[1]` node, `ARGV[2]` lease ms, `ARGV[2+i]` the limit of
/// `KEYS[i]`. Returns 0 when taken, else the (1-based) index of the full scope.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, lease = ARGV[1], tonumber(ARGV[2])
local own = {}
for i, key in ipairs(KEYS) do
  local total = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    local c, exp = string.match(fields[j + 1], '^(%d+):(%d+)$')
    if c and tonumber(exp) > now then
      total = total + tonumber(c)
      if fields[j] == node then own[i] = tonumber(c) end
    else
      redis.call('HDEL', key, fields[j])
    end
  end
  if total >= tonumber(ARGV[2 + i]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, node, ((own[i] or 0) + 1) .. ':' .. (now + lease))
  redis.call('PEXPIRE', key, lease)
end
return 0
";

/// `KEYS`: scope hashes; `ARGV[1]` node, `ARGV[2]` lease ms. One connection less in each.
const RELEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, lease = ARGV[1], tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  local c = tonumber(string.match(redis.call('HGET', key, node) or '', '^(%d+):') or '0')
  if c <= 1 then
    redis.call('HDEL', key, node)
  else
    redis.call('HSET', key, node, (c - 1) .. ':' .. (now + lease))
  end
end
return 0
";

/// `KEYS`: scope hashes; `ARGV[1]` node, `ARGV[2]` lease ms, `ARGV[2+i]` this node's count
/// in `KEYS[i]`. Renews the lease with the node's exact counts.
const REFRESH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, lease = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local c = tonumber(ARGV[2 + i])
  if c > 0 then
    redis.call('HSET', key, node, c .. ':' .. (now + lease))
    redis.call('PEXPIRE', key, lease)
  else
    redis.call('HDEL', key, node)
  end
end
return 0
";

/// `KEYS[1]`: a scope hash. The connections of the live leases in it (read-only).
const COUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for j = 1, #fields, 2 do
  local c, exp = string.match(fields[j + 1], '^(%d+):(%d+)$')
  if c and tonumber(exp) > now then total = total + tonumber(c) end
end
return total
";

/// Connection counts in Redis, as one node sees them.
pub struct RedisQuotaStore {
    conn: RedisConn,
    prefix: String,
    node: String,
    lease: Duration,
    /// This node's exact counts by hash key: what the lease renewal writes.
    local: Mutex<HashMap<String, u64>>,
    acquire: Script,
    release: Script,
    refresh: Script,
    count: Script,
}

impl RedisQuotaStore {
    /// A store for the Redis at `url`, keys under `key_prefix`, counting for the node
    /// instance `node` with leases of `lease`. Does not dial; fails only for a bad URL.
    pub fn connect(
        url: &str,
        key_prefix: &str,
        node: &str,
        lease: Duration,
    ) -> Result<Self, QuotaError> {
        Ok(Self::new(
            connection(url).map_err(QuotaError::Unavailable)?,
            key_prefix,
            node,
            lease,
        ))
    }

    /// A store on `conn` (any [`RedisConn`] mode); see [`RedisQuotaStore::connect`].
    pub fn new(conn: RedisConn, key_prefix: &str, node: &str, lease: Duration) -> Self {
        Self {
            conn,
            prefix: key_prefix.to_owned(),
            node: node.to_owned(),
            lease,
            local: Mutex::default(),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            refresh: Script::new(REFRESH),
            count: Script::new(COUNT),
        }
    }

    fn key(&self, s: &Scope) -> String {
        let (prefix, tenant) = (&self.prefix, &s.tenant);
        match s.kind {
            ScopeKind::Tenant => format!("{prefix}:conns:{{{tenant}}}:tenant"),
            ScopeKind::Application => format!("{prefix}:conns:{{{tenant}}}:app:{}", s.id),
            ScopeKind::Key => format!("{prefix}:conns:{{{tenant}}}:key:{}", s.id),
        }
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl QuotaStore for RedisQuotaStore {
    async fn acquire(&self, scopes: &[Scope]) -> Result<Option<usize>, QuotaError> {
        let keys: Vec<String> = scopes.iter().map(|s| self.key(s)).collect();
        let mut invocation = self.acquire.prepare_invoke();
        invocation.arg(&self.node).arg(self.lease_ms());
        for (k, s) in keys.iter().zip(scopes) {
            invocation.key(k).arg(s.limit);
        }
        let mut conn = self.conn.clone();
        let full: usize = run(
            "acquire connection quota",
            invocation.invoke_async(&mut conn),
        )
        .await
        .map_err(QuotaError::Unavailable)?;
        if full > 0 {
            return Ok(Some(full - 1));
        }
        let mut local = self.local();
        for k in keys {
            *local.entry(k).or_default() += 1;
        }
        Ok(None)
    }

    async fn release(&self, scopes: &[Scope]) -> Result<(), QuotaError> {
        let keys: Vec<String> = scopes.iter().map(|s| self.key(s)).collect();
        {
            let mut local = self.local();
            for k in &keys {
                if let Some(c) = local.get_mut(k) {
                    *c = c.saturating_sub(1);
                }
            }
        }
        let mut invocation = self.release.prepare_invoke();
        invocation.arg(&self.node).arg(self.lease_ms());
        for k in &keys {
            invocation.key(k);
        }
        let mut conn = self.conn.clone();
        run::<()>(
            "release connection quota",
            invocation.invoke_async(&mut conn),
        )
        .await
        .map_err(QuotaError::Unavailable)
    }

    async fn count(&self, scope: &Scope) -> Result<u64, QuotaError> {
        let mut invocation = self.count.prepare_invoke();
        invocation.key(self.key(scope));
        let mut conn = self.conn.clone();
        run("count connections", invocation.invoke_async(&mut conn))
            .await
            .map_err(QuotaError::Unavailable)
    }

    async fn refresh(&self) -> Result<(), QuotaError> {
        // Grouped by tenant, so that one script's keys share a Redis Cluster slot, and in
        // chunks, so that one call stays short.
        let mut by_tenant: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        for (k, c) in self.local().iter() {
            let tag = k.split(['{', '}']).nth(1).unwrap_or_default().to_owned();
            by_tenant.entry(tag).or_default().push((k.clone(), *c));
        }
        for chunk in by_tenant.values().flat_map(|keys| keys.chunks(256)) {
            let mut invocation = self.refresh.prepare_invoke();
            invocation.arg(&self.node).arg(self.lease_ms());
            for (k, c) in chunk {
                invocation.key(k).arg(*c);
            }
            let mut conn = self.conn.clone();
            run::<()>(
                "renew connection quota lease",
                invocation.invoke_async(&mut conn),
            )
            .await
            .map_err(QuotaError::Unavailable)?;
        }
        // Scopes written as 0 above are gone from Redis; forget them here too.
        self.local().retain(|_, c| *c > 0);
        Ok(())
    }
}
