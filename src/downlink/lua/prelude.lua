-- Shared start of every downlink queue script (see src/downlink/redis.rs for the layout).
-- KEYS[1] the device's list, KEYS[2] the tenant's quota hash, KEYS[3] the tenant's
-- expiry sorted set; ARGV[1] the application ID, ARGV[2] the queue's member "<app>:<dev>".
-- All three keys carry the tenant's hash tag, so they live on one Redis Cluster slot.
local list, quota, expiry = KEYS[1], KEYS[2], KEYS[3]
local app_field = 'app:' .. ARGV[1]
local dev_field = 'dev:' .. ARGV[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function num(v)
  return tonumber(v) or 0
end

-- Adds delta bytes to a counter, deleting it when it reaches zero. (A zero delta is
-- skipped: Lua would send -0, which HINCRBY refuses.)
local function add(field, delta)
  if delta == 0 then
    return
  end
  if redis.call('HINCRBY', quota, field, delta) <= 0 then
    redis.call('HDEL', quota, field)
  end
end

-- Gives the bytes of queue `member` back to its application and tenant, and forgets it.
local function forget(member)
  local bytes = num(redis.call('HGET', quota, 'dev:' .. member))
  if bytes ~= 0 then
    add('app:' .. string.match(member, '^([^:]*):'), -bytes)
    add('tenant', -bytes)
  end
  redis.call('HDEL', quota, 'dev:' .. member)
  redis.call('ZREM', expiry, member)
end

-- Redis has deleted the lists idle past their deadline; forget up to 64 of them, oldest
-- first (each queue is forgotten once, and every write adds at most one). The grace second
-- keeps clear of the script's own clock, which Redis freezes at the script's start when
-- it decides whether a key has expired.
local stale = redis.call('ZRANGEBYSCORE', expiry, '-inf', '(' .. (now - 1000), 'LIMIT', 0, 64)
for _, member in ipairs(stale) do
  forget(member)
end

-- This device's list may have expired before a sweep reached it.
local n = redis.call('LLEN', list)
if n == 0 and redis.call('HEXISTS', quota, dev_field) == 1 then
  forget(ARGV[2])
end
local dev_bytes = num(redis.call('HGET', quota, dev_field))
local app_bytes = num(redis.call('HGET', quota, app_field))
local tenant_bytes = num(redis.call('HGET', quota, 'tenant'))

-- After a write: the list expires when idle for `idle` ms; the accounting outlives it.
local function touch(idle)
  redis.call('PEXPIRE', list, idle)
  redis.call('ZADD', expiry, now + idle, ARGV[2])
  redis.call('PEXPIRE', quota, idle + 60000)
  redis.call('PEXPIRE', expiry, idle + 60000)
end

-- RPUSH of ARGV[first..], in chunks: Lua's unpack is limited by its C stack (~8000
-- values), and a queue may be 10000 long.
local function push_items(first)
  for i = first, #ARGV, 1000 do
    redis.call('RPUSH', list, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end

-- Bytes of ARGV[first..].
local function bytes_from(first)
  local bytes = 0
  for i = first, #ARGV do
    bytes = bytes + #ARGV[i]
  end
  return bytes
end
