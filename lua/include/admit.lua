-- admit.lua: the admission rule: used + held + this <= value for every limit.
-- needs: num, window, clock, scan, holds_read, refusal

-- First limit that refuses used + held + this (-1 if none), and µs until rolling buckets free
-- enough room (-1 if the window alone never frees enough).
local function admit(lims, used, held, amt, now)
  for i, l in ipairs(lims) do
    local m = (l.p - 1) % 3 + 1
    local this = amt[m]
    local need = used[l.p] + held[l.p] + this - l.v
    if need > 0 then
      local retry = -1
      if l.z and held[l.p] + this <= l.v then
        local buckets = redis.call('ZRANGE', l.z, 0, -1)
        if buckets[1] ~= redis.call('HGET', l.h, 'o') then  -- the index was lost (window.lua)
          reindex(l.h, l.z)
          buckets = redis.call('ZRANGE', l.z, 0, -1)
        end
        local current = redis.call('HGET', l.h, 'k')
        local freed = 0
        for _, b in ipairs(buckets) do
          local field = (b == current and 'k' or b) .. M[m]
          freed = freed + (tonumber(redis.call('HGET', l.h, field)) or 0)
          if freed >= need then
            retry = (tonumber(b) + 1) * l.bs + l.w - now
            break
          end
        end
      end
      return i, retry
    end
  end
  return -1, -1
end

-- The admission step of check and reserve: reap expired leases, read every counter and its holds,
-- apply the rule; a refusal is counted (refusal.lua). Returns now, the amounts, the counter ids,
-- the totals (one string), the held amounts and, when refused, the script's reply (nil: admitted).
local function admission()
  local now = now_us()
  reap(now)
  local amt = amounts()
  local totals, _, ids, lims = scan(now, amt, false)
  local held = read_held(ids)
  local refused, retry = admit(lims, totals, held, amt, now)
  local used = table.concat(totals, ' ')
  if refused < 0 then return now, amt, ids, used, held, nil end
  local l = lims[refused]
  local alert = refuse(refused, l, totals[l.p] + held[l.p] + amt[(l.p - 1) % 3 + 1], now)
  return now, amt, ids, used, held, {1, now, used, held, refused, retry, alert}
end
