-- holds_read.lua: read the holds of a plan's counters, after reaping the expired ones.
-- needs: holds, num

-- The leases set lost (evicted, deleted) while holds survive: put each hold's lease back, from the
-- expiry its record carries (a record without one is due now), so no hold is held forever.
local function relink(now)
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    if not string.find(flat[i], '|', 1, true) then  -- a hold id (the counters' fields hold a '|')
      local expiry = string.match(flat[i + 1], '^%d+ %d+ %d+ (%d+)')
      redis.call('ZADD', KEYS[2], expiry or fmt(now), flat[i])
    end
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end

-- Reap every lease that expired (each hold is reaped once: amortised O(1) per reservation). A
-- lease whose hold record is gone is removed all the same.
local function reap(now)
  if redis.call('PTTL', KEYS[1]) ~= -2 and redis.call('PTTL', KEYS[2]) == -2 then relink(now) end
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
  for _, id in ipairs(ids) do
    if not drop_hold(id) then redis.call('ZREM', KEYS[2], id) end
  end
end

-- Amounts held per counter (3 per counter, plan order, like the totals).
local function read_held(ids)
  local fields = {}
  for _, id in ipairs(ids) do
    for m = 1, 3 do fields[#fields + 1] = id .. '|' .. M[m] end
  end
  local v = redis.call('HMGET', KEYS[1], unpack(fields))
  local out = {}
  for k = 1, #fields do out[k] = tonumber(v[k]) or 0 end
  return out
end
