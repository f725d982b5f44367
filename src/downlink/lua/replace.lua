-- Replace: the arguments and results of push.lua; no items clears the queue. A replace
-- that does not grow the queue's bytes always passes the quotas.
local count = #ARGV - 7
if count > tonumber(ARGV[3]) then
  return {1, 0, count}
end
local bytes = bytes_from(8)
if bytes > tonumber(ARGV[4]) then
  return {2, 0, bytes}
end
if bytes > dev_bytes then
  if app_bytes - dev_bytes + bytes > tonumber(ARGV[5]) then
    return {3, app_bytes - dev_bytes, bytes}
  end
  if tenant_bytes - dev_bytes + bytes > tonumber(ARGV[6]) then
    return {4, tenant_bytes - dev_bytes, bytes}
  end
end
redis.call('DEL', list)
forget(ARGV[2])
if count == 0 then
  return {0, 0}
end
push_items(8)
add(dev_field, bytes)
add(app_field, bytes)
add('tenant', bytes)
touch(tonumber(ARGV[7]))
return {0, count}
