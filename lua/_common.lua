-- _common.lua: helpers prepended to every distbudget script (this file is never run alone).
--
-- The plan (see distbudget/_core/plan.py) arrives in ARGV from index 8:
--   nc, then per counter: hash KEYS index, field prefix, zset KEYS index (0: not a window),
--                         bucket µs, window µs, TTL ms (0: owned key, no TTL)
--   nl, then per limit:   counter index, metric (1 tokens, 2 cost, 3 requests), value,
--                         warn_at (-1: none), warn_rearm, crit_at, crit_rearm, limit name
-- ARGV[1] is the injected clock in µs ('' = the server's TIME), ARGV[2..4] the amounts
-- (tokens, nano-USD, requests), ARGV[5..7] operation-specific.
-- KEYS[1] is the tree's holds hash, KEYS[2] its leases sorted set.
--
-- Numbers are Lua doubles: exact for integers below 2^53. Every number sent back to Redis goes
-- through fmt() because tostring() would print large integers in exponent form.

local M = {'t', 'c', 'r'}

local function fmt(n)
  return string.format('%d', n)
end

local function now_us()
  if ARGV[1] ~= '' then
    return tonumber(ARGV[1])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function parse_plan()
  local i = 8
  local counters, limits = {}, {}
  for c = 1, tonumber(ARGV[i]) do
    local h = KEYS[tonumber(ARGV[i + 1])]
    local p = ARGV[i + 2]
    local zi = tonumber(ARGV[i + 3])
    counters[c] = {
      h = h, p = p, z = (zi > 0) and KEYS[zi] or nil,
      bs = tonumber(ARGV[i + 4]), w = tonumber(ARGV[i + 5]), ttl = tonumber(ARGV[i + 6]),
      id = h .. '|' .. p,
    }
    i = i + 6
  end
  i = i + 1
  for l = 1, tonumber(ARGV[i]) do
    limits[l] = {
      c = counters[tonumber(ARGV[i + 1])], m = tonumber(ARGV[i + 2]), v = tonumber(ARGV[i + 3]),
      warn = tonumber(ARGV[i + 4]), warn_re = tonumber(ARGV[i + 5]),
      crit = tonumber(ARGV[i + 6]), crit_re = tonumber(ARGV[i + 7]), name = ARGV[i + 8],
    }
    i = i + 8
  end
  return counters, limits
end

-- Subtract the buckets that have wholly left a window. A bucket b covers [b*bs, (b+1)*bs) and
-- counts while (b+1)*bs > now - w, so the oldest live bucket is floor((now - w) / bs).
local function expire(c, now)
  if not c.z then return end
  local lo = fmt(math.floor((now - c.w) / c.bs))
  local old = redis.call('ZRANGEBYSCORE', c.z, '-inf', '(' .. lo)
  if #old == 0 then return end
  local fields = {}
  for _, b in ipairs(old) do
    for m = 1, 3 do fields[#fields + 1] = b .. M[m] end
  end
  local vals = redis.call('HMGET', c.h, unpack(fields))
  local gone = {0, 0, 0}
  for k = 1, #fields do
    local m = (k - 1) % 3 + 1
    gone[m] = gone[m] + (tonumber(vals[k]) or 0)
  end
  redis.call('HDEL', c.h, unpack(fields))
  redis.call('ZREMRANGEBYSCORE', c.z, '-inf', '(' .. lo)
  for m = 1, 3 do
    if gone[m] ~= 0 then redis.call('HINCRBY', c.h, M[m], fmt(-gone[m])) end
  end
end

-- Current totals of a counter (after expire).
local function read(c)
  local p = c.p
  local v = redis.call('HMGET', c.h, p .. 't', p .. 'c', p .. 'r')
  c.u = {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0}
end

-- Add amounts (strings of integers) to a counter; c.u receives the new totals.
local function charge(c, now, amt)
  local p = c.p
  local u = {0, 0, 0}
  local b = nil
  if c.z then
    b = fmt(math.floor(now / c.bs))
    redis.call('ZADD', c.z, b, b)
  end
  for m = 1, 3 do
    if amt[m] ~= '0' then
      u[m] = redis.call('HINCRBY', c.h, p .. M[m], amt[m])
      if b then redis.call('HINCRBY', c.h, b .. M[m], amt[m]) end
    else
      u[m] = tonumber(redis.call('HGET', c.h, p .. M[m]) or '0')
    end
  end
  if c.ttl > 0 then
    redis.call('PEXPIRE', c.h, c.ttl)
    if c.z then redis.call('PEXPIRE', c.z, c.ttl) end
  end
  c.u = u
end

local function totals(counters)
  local out = {}
  for _, c in ipairs(counters) do
    out[#out + 1] = c.u[1]; out[#out + 1] = c.u[2]; out[#out + 1] = c.u[3]
  end
  return out
end

-- Decide threshold crossings for a charge of amt: re-arm on the usage before it, fire on the usage
-- after it. Alert state (bit 1 WARNING, bit 2 CRITICAL) lives beside the counter, so every window
-- instance (each session, each rolling window) has its own. Returns {limit index, level, ...}.
local function alerts(limits, amt)
  local out = {}
  for i, l in ipairs(limits) do
    local after = l.c.u[l.m]
    local before = after - tonumber(amt[l.m])
    local f = l.c.p .. 'a:' .. l.name
    local st = tonumber(redis.call('HGET', l.c.h, f) or '0')
    local ns = st
    if ns % 2 == 1 and before < l.warn_re then ns = ns - 1 end
    if ns >= 2 and before < l.crit_re then ns = ns - 2 end
    if l.warn >= 0 and ns % 2 == 0 and after >= l.warn then
      ns = ns + 1; out[#out + 1] = i; out[#out + 1] = 1
    end
    if ns < 2 and after >= l.crit then
      ns = ns + 2; out[#out + 1] = i; out[#out + 1] = 2
    end
    if ns ~= st then
      if ns == 0 then redis.call('HDEL', l.c.h, f) else redis.call('HSET', l.c.h, f, ns) end
    end
  end
  return out
end

-- Holds: KEYS[1] maps a hold id to "tokens cost requests\n<counter id>\n..." and each
-- "<counter id>|<metric>" to the amount held on that counter; KEYS[2] orders hold ids by expiry.
local function drop_hold(id)
  local v = redis.call('HGET', KEYS[1], id)
  if not v then return false end
  local amt = nil
  for line in string.gmatch(v, '[^\n]+') do
    if not amt then
      amt = {}
      for n in string.gmatch(line, '%d+') do amt[#amt + 1] = tonumber(n) end
    else
      for m = 1, 3 do
        if amt[m] ~= 0 then
          local f = line .. '|' .. M[m]
          if redis.call('HINCRBY', KEYS[1], f, fmt(-amt[m])) <= 0 then redis.call('HDEL', KEYS[1], f) end
        end
      end
    end
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  return true
end

-- Reap every lease that expired (each hold is reaped once: amortised O(1) per reservation).
local function reap(now)
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
  for _, id in ipairs(ids) do drop_hold(id) end
end

local function read_held(counters)
  local fields = {}
  for _, c in ipairs(counters) do
    for m = 1, 3 do fields[#fields + 1] = c.id .. '|' .. M[m] end
  end
  local v = redis.call('HMGET', KEYS[1], unpack(fields))
  local out = {}
  for k = 1, #fields do out[k] = tonumber(v[k]) or 0 end
  for ci, c in ipairs(counters) do
    c.held = {out[3 * ci - 2], out[3 * ci - 1], out[3 * ci]}
  end
  return out
end

-- First limit that refuses used + held + this (-1 if none), and µs until rolling buckets free
-- enough room (-1 if the window alone never frees enough).
local function admit(limits, amt, now)
  for i, l in ipairs(limits) do
    local this = tonumber(amt[l.m])
    local need = l.c.u[l.m] + l.c.held[l.m] + this - l.v
    if need > 0 then
      local retry = -1
      if l.c.z and l.c.held[l.m] + this <= l.v then
        local buckets = redis.call('ZRANGE', l.c.z, 0, -1)
        local freed = 0
        for _, b in ipairs(buckets) do
          freed = freed + (tonumber(redis.call('HGET', l.c.h, b .. M[l.m])) or 0)
          if freed >= need then
            retry = (tonumber(b) + 1) * l.c.bs + l.c.w - now
            break
          end
        end
      end
      return i, retry
    end
  end
  return -1, -1
end

-- Idempotency: KEYS[#KEYS] is the request key when ARGV[5] (its TTL in ms) is set.
local function seen_request()
  if ARGV[5] == '' then return nil end
  return redis.call('GET', KEYS[#KEYS])
end

local function remember_request(now, amt)
  if ARGV[5] == '' then return end
  redis.call('SET', KEYS[#KEYS], fmt(now) .. ' ' .. amt[1] .. ' ' .. amt[2], 'PX', ARGV[5])
end
