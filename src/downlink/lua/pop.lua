-- Take next downlink (the upstream's side): LPOP, and the item's bytes leave the device,
-- application and tenant counters in the same step. Not a write: the deadline stays.
-- Returns the item, or nil when the queue is empty.
local item = redis.call('LPOP', list)
if not item then
  return false
end
add(dev_field, -#item)
add(app_field, -#item)
add('tenant', -#item)
if n == 1 then
  forget(ARGV[2])
end
return item
