-- holds_read.lua: read the holds of a plan's counters, after reaping the expired ones.
-- needs: holds, num

-- Reap every lease that expired (each hold is reaped once: amortised O(1) per reservation).
local function reap(now)
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
  for _, id in ipairs(ids) do drop_hold(id) end
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
