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

-- Fields are read and written in bulk: one HMGET and at most one HSET per hash, whatever the
-- number of counters, buckets and alert states in it (each redis.call costs more than the Lua).
-- load() registers the fields every counter and limit needs and reads them:
--   c.e        the hash entry {f = field names, v = values, set = pending writes}
--   c.fi[m]    index of the counter's running total for metric m
--   c.bi[m]    (windows) index of the current bucket's amount, c.b the bucket id
--   c.oi       (windows) index of field 'o', the oldest bucket id present
--   l.ai       index of the limit's alert state (bit 1 WARNING, bit 2 CRITICAL)
local function load(counters, limits, now)
  local hashes, order = {}, {}
  local function want(e, f)
    local i = e.idx[f]
    if not i then
      i = #e.f + 1
      e.f[i] = f
      e.idx[f] = i
    end
    return i
  end
  for _, c in ipairs(counters) do
    local e = hashes[c.h]
    if not e then
      e = {h = c.h, f = {}, idx = {}, set = {}, ttl = 0}
      hashes[c.h] = e
      order[#order + 1] = e
    end
    if c.ttl > e.ttl then e.ttl = c.ttl end
    c.e = e
    local p = c.p
    c.fi = {want(e, p .. 't'), want(e, p .. 'c'), want(e, p .. 'r')}
    if c.z then
      c.b = fmt(math.floor(now / c.bs))
      c.bi = {want(e, c.b .. 't'), want(e, c.b .. 'c'), want(e, c.b .. 'r')}
      c.oi = want(e, 'o')
    end
  end
  for _, l in ipairs(limits) do
    l.ai = want(l.c.e, l.c.p .. 'a:' .. l.name)
  end
  for _, e in ipairs(order) do
    local raw = redis.call('HMGET', e.h, unpack(e.f))
    local v = {}
    for k = 1, #e.f do v[k] = raw[k] and tonumber(raw[k]) end
    e.v = v
  end
  return order
end

local function put(e, i, value)
  e.v[i] = value
  e.set[#e.set + 1] = e.f[i]
  e.set[#e.set + 1] = fmt(value)
end

-- Subtract the buckets that have wholly left a window. A bucket b covers [b*bs, (b+1)*bs) and
-- counts while (b+1)*bs > now - w, so the oldest live bucket is floor((now - w) / bs). Field 'o'
-- (the oldest bucket present) makes the common case, nothing to expire, cost no call at all.
local function expire(c, now)
  if not c.z then return end
  local e = c.e
  local oldest = e.v[c.oi]
  local lo = math.floor((now - c.w) / c.bs)
  if not oldest or oldest >= lo then return end
  local old = redis.call('ZRANGEBYSCORE', c.z, '-inf', '(' .. fmt(lo))
  if #old > 0 then
    local fields = {}
    for _, b in ipairs(old) do
      for m = 1, 3 do fields[#fields + 1] = b .. M[m] end
    end
    local vals = redis.call('HMGET', c.h, unpack(fields))
    for k = 1, #fields do
      local m = (k - 1) % 3 + 1
      e.v[c.fi[m]] = (e.v[c.fi[m]] or 0) - (tonumber(vals[k]) or 0)
    end
    redis.call('HDEL', c.h, unpack(fields))
    redis.call('ZREMRANGEBYSCORE', c.z, '-inf', '(' .. fmt(lo))
    for m = 1, 3 do put(e, c.fi[m], e.v[c.fi[m]]) end
  end
  local first = redis.call('ZRANGE', c.z, 0, 0)
  if first[1] then
    put(e, c.oi, tonumber(first[1]))
  else
    redis.call('HDEL', c.h, 'o')
    e.v[c.oi] = nil
  end
end

-- Current totals of a counter (after expire) into c.u.
local function read(c)
  local v = c.e.v
  c.u = {v[c.fi[1]] or 0, v[c.fi[2]] or 0, v[c.fi[3]] or 0}
end

-- Add amounts (numbers) to a counter; c.u receives the new totals.
local function charge(c, amt)
  local e = c.e
  for m = 1, 3 do
    if amt[m] ~= 0 then put(e, c.fi[m], (e.v[c.fi[m]] or 0) + amt[m]) end
  end
  if c.z then
    if not e.v[c.bi[1]] then
      redis.call('ZADD', c.z, c.b, c.b)
      local oldest = e.v[c.oi]
      if not oldest or tonumber(c.b) < oldest then put(e, c.oi, tonumber(c.b)) end
    end
    for m = 1, 3 do
      if amt[m] ~= 0 or not e.v[c.bi[m]] then put(e, c.bi[m], (e.v[c.bi[m]] or 0) + amt[m]) end
    end
  end
  read(c)
end

-- One HSET per hash with everything that changed, and the idle TTL where the hash has one.
local function flush(order)
  for _, e in ipairs(order) do
    if #e.set > 0 then redis.call('HSET', e.h, unpack(e.set)) end
    if e.ttl > 0 then redis.call('PEXPIRE', e.h, e.ttl) end
  end
end

local function totals(counters)
  local out = {}
  for _, c in ipairs(counters) do
    out[#out + 1] = c.u[1]; out[#out + 1] = c.u[2]; out[#out + 1] = c.u[3]
  end
  return out
end

-- Decide threshold crossings for a charge of amt: re-arm on the usage before it, fire on the usage
-- after it. The state lives beside the counter, so every window instance (each session, each
-- rolling window) has its own. Returns {limit index, level, ...}.
local function alerts(limits, amt)
  local out = {}
  for i, l in ipairs(limits) do
    local after = l.c.u[l.m]
    local before = after - amt[l.m]
    local st = l.c.e.v[l.ai] or 0
    local ns = st
    if ns % 2 == 1 and before < l.warn_re then ns = ns - 1 end
    if ns >= 2 and before < l.crit_re then ns = ns - 2 end
    if l.warn >= 0 and ns % 2 == 0 and after >= l.warn then
      ns = ns + 1; out[#out + 1] = i; out[#out + 1] = 1
    end
    if ns < 2 and after >= l.crit then
      ns = ns + 2; out[#out + 1] = i; out[#out + 1] = 2
    end
    if ns ~= st then put(l.c.e, l.ai, ns) end
  end
  return out
end

-- Every counter of the plan, loaded and aged (the common start of every operation).
local function prepare(now)
  local counters, limits = parse_plan()
  local order = load(counters, limits, now)
  for _, c in ipairs(counters) do
    expire(c, now)
    read(c)
  end
  return counters, limits, order
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
    local this = amt[l.m]
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
  redis.call('SET', KEYS[#KEYS], fmt(now) .. ' ' .. fmt(amt[1]) .. ' ' .. fmt(amt[2]), 'PX', ARGV[5])
end

local function amounts()
  return {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
end
