-- window.lua: a rolling window's bucket index (its z: sorted set) rebuilt from its hash.
--
-- A window is two keys: its hash (the running totals; each bucket's amounts in fields '<id>t',
-- '<id>c', '<id>r', the current bucket's in 'kt', 'kc', 'kr' with its id in 'k'; the oldest
-- bucket's id in 'o') and the sorted set of its bucket ids. When the sorted set was lost (evicted,
-- deleted) while the hash survived, the hash's own fields still name every bucket: reindex() puts
-- them back, with the hash's TTL, so the window drains as its buckets age out. Nothing is refused
-- forever and no charge the hash holds is forgotten. (A lost hash takes its amounts with it: the
-- ids left in the sorted set then name no amounts, and free nothing when they age out.)
local function reindex(h, z)
  local ids, seen = {}, {}
  local current = redis.call('HGET', h, 'k')
  if current then
    seen[current] = true
    ids[1], ids[2] = current, current
  end
  for _, f in ipairs(redis.call('HKEYS', h)) do
    local id = string.match(f, '^(%-?%d+)[tcr]$')
    if id and not seen[id] then
      seen[id] = true
      ids[#ids + 1] = id
      ids[#ids + 1] = id
    end
  end
  if #ids == 0 then return end
  redis.call('ZADD', z, unpack(ids))
  local ttl = redis.call('PTTL', h)
  if ttl > 0 then redis.call('PEXPIRE', z, ttl) end
end
