-- Push: ARGV[3] capacity in items; ARGV[4], ARGV[5], ARGV[6] the device, application and
-- tenant byte limits; ARGV[7] the idle expiry in ms; ARGV[8..] the items.
-- Returns {0, new length} when stored, otherwise {reason, queued, adding} with reason
-- 1 capacity (items), 2 device bytes, 3 application quota, 4 tenant quota.
local adding = #ARGV - 7
if adding == 0 then
  return {0, n}
end
if n + adding > tonumber(ARGV[3]) then
  return {1, n, adding}
end
local bytes = bytes_from(8)
if dev_bytes + bytes > tonumber(ARGV[4]) then
  return {2, dev_bytes, bytes}
end
if app_bytes + bytes > tonumber(ARGV[5]) then
  return {3, app_bytes, bytes}
end
if tenant_bytes + bytes > tonumber(ARGV[6]) then
  return {4, tenant_bytes, bytes}
end
push_items(8)
add(dev_field, bytes)
add(app_field, bytes)
add('tenant', bytes)
touch(tonumber(ARGV[7]))
return {0, n + adding}
