-- scan.lua: the window scan: one pass over a plan's counters (read, age, charge, alert crossings).
-- needs: num, window
--
-- The plan arrives in the wire format documented once, next to its encoder, in
-- distbudget/engines/codec.py: its numbers packed in ONE binary string, ARGV[8] (the shape: a hot
-- part read on every call, a cold part of 28 bytes per limit read only when needed), ARGV[9..] the
-- field names, KEYS[3..] the hashes (each window's sorted set right after its hash).

local MAXN = 9007199254740991  -- 2^53 - 1: the largest integer a counter holds exactly

-- The slack of an idle TTL in ms (see scan): refreshes at most once a minute, or 16 times a TTL.
local function slack(ttl)
  return math.min(math.floor(ttl / 16), 60000)
end

-- The big number at byte k of the shape's cold part.
local function big(k)
  local b1, b2, b3, b4, b5, b6, b7 = string.byte(ARGV[8], k, k + 6)
  return (((((b1 * 256 + b2) * 256 + b3) * 256 + b4) * 256 + b5) * 256 + b6) * 256 + b7
end

-- One pass over the plan, hash by hash: HMGET its fields, age out the buckets that have wholly left
-- a window, charge amt when `charging` (record, commit) and decide the alert crossings, then HSET
-- what changed and refresh the TTL where due (see below). `first` is the KEYS index of the first
-- hash (default 3, after the holds hash and leases; record, which never touches holds, passes 1)
-- and `nows` is fmt(now) (needed when charging). Returns the totals (3 per counter, plan order, as decimal
-- strings), the alerts fired ({limit index, level, ...}, in any order) and, when not charging, the
-- counter ids and the limits as tables (for read_held, admit and refuse).
--
-- A bucket b covers [b*bs, (b+1)*bs) and counts while (b+1)*bs > now - w, so the oldest live bucket
-- is floor((now - w) / bs). Field 'o' (the oldest bucket present) makes the common case, nothing to
-- expire, cost no call at all. Alert states: bit 1 WARNING, bit 2 CRITICAL; a crossing re-arms on the
-- usage before the charge and fires on the usage after it.
--
-- TTLs are refreshed only when due, never on reads: a window's hash and sorted set when a charge
-- opens a new bucket (its data is dead one window after its newest bucket, and the TTL is window +
-- bucket + 1 h), an idle-TTL hash (a session) when a charge finds its last refresh, field 'x',
-- older than slack(ttl) = min(ttl / 16, 60 s), to ttl + slack: the key outlives its last charge by
-- at least ttl and at most ttl + slack (the memory engine keeps the same rule).
local function scan(now, amt, charging, first, nows)
  local A, call, floor, sbyte = ARGV, redis.call, math.floor, string.byte
  local shape = A[8]
  local h1, h2, g1, g2, n1, n2 = sbyte(shape, 1, 6)
  local cold = h1 * 256 + h2 - 27        -- cold(li) = cold + 28 * li
  local nt = 3 * (n1 * 256 + n2)        -- totals returned; their table is sized up front
  local out = nt < 7000 and {sbyte(shape, 1, nt)} or {}
  local fired, nfired = {}, 0
  local ids, lims
  if not charging then ids, lims = {}, {} end
  -- pending HSET field, value, ... of every hash (sized once: growing a table rehashes it)
  local S = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
  -- A charge's writes wait in S, W and X until every counter is known to stay exact (at most
  -- 2^53 - 1): a script never writes and then fails (Redis would not roll earlier writes back).
  -- W, per hash with fields to set: key, first and last index of its fields in S. X (rare: a new
  -- bucket, a TTL due), per such hash: key, TTL to set or false, window sorted set, new bucket id or
  -- false, its TTL or false.
  local W, X, nw, nx, n, over = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil, 0, 0, 0, nil
  local a1, a2, a3 = 0, 0, 0    -- the amounts charged (none when only reading)
  if charging then a1, a2, a3 = amt[1], amt[2], amt[3] end
  local k, x, ki = 7, 9, first or 3  -- next shape byte, next ARGV string, next KEYS index
  for _ = 1, g1 * 256 + g2 do
    local kind, tt, c1, c2, l1, l2 = sbyte(shape, k, k + 5)
    k = k + 6
    local nc, nl = c1 * 256 + c2, l1 * 256 + l2
    local ttl = tt == 1 and A[x]
    if ttl then x = x + 1 end
    local h = KEYS[ki]
    local lit = kind > 0 and 3 or 0   -- field names of the first counter given as literals
    local nn = 3 * nc - lit + nl      -- field names in ARGV, from A[x]
    local n0 = n                      -- S[n0 + 1 .. n]: this hash's pending writes
    local zadd, zttl = false, false   -- a new bucket for the window's sorted set
    -- V[j] is the value of field A[fb + j] (or of a literal field); counter totals from V[d + 1],
    -- alert states from V[ai + 1]
    local V, d, fb, ai, z, bs, w, b, bk
    local refresh                     -- the TTL to set on the hash after its HSET, when due
    if kind == 2 then
      z = KEYS[ki + 1]
      ki = ki + 2
      local s1, s2, s3, w1, w2, w3, w4 = sbyte(shape, k, k + 6)
      k = k + 7
      bs = ((s1 * 256 + s2) * 256 + s3) * 1000000
      w = (((w1 * 256 + w2) * 256 + w3) * 256 + w4) * 1000000
      b = floor(now / bs)
      -- The current bucket's amounts live in fields 'kt', 'kc', 'kr' (its id in 'k'), created with
      -- the totals at the head of the hash, so a charge never looks up fields at the tail of a long
      -- listpack; a bucket gets fields of its own ('<id>t' ...) once, when the next one starts.
      -- V[1..3] the current bucket, V[4..6] the totals, V[7] the oldest bucket, V[8] the current id
      V = call('HMGET', h, 'kt', 'kc', 'kr', 't', 'c', 'r', 'o', 'k', unpack(A, x, x + nn - 1))
      d, fb, ai = 3, x - 9, 8
      local k = V[8]
      if k and k + 0 >= b then                -- a clock that stepped back charges the newest bucket
        b = k + 0
        bk = k
      else
        bk = sformat('%d', b)
      end
      if k and k ~= bk then                   -- the current bucket has ended: settle it
        call('HSET', h, k .. 't', V[1] or '0', k .. 'c', V[2] or '0', k .. 'r', V[3] or '0')
        V[1], V[2], V[3], V[8] = false, false, false, false
        if not charging then call('HDEL', h, 'k', 'kt', 'kc', 'kr') end
      end
      local oldest = V[7]
      local lo = floor((now - w) / bs)
      if oldest and oldest + 0 < lo then
        local old = call('ZRANGEBYSCORE', z, '-inf', '(' .. fmt(lo))
        if old[1] ~= oldest then      -- 'o' is not the index's first: the index was lost (window.lua)
          reindex(h, z)
          old = call('ZRANGEBYSCORE', z, '-inf', '(' .. fmt(lo))
        end
        if #old > 0 then
          local fields = {}
          for _, ob in ipairs(old) do
            for m = 1, 3 do fields[#fields + 1] = ob .. M[m] end
          end
          local vals = call('HMGET', h, unpack(fields))
          local t = {V[4] or 0, V[5] or 0, V[6] or 0}
          for j = 1, #fields do
            local m = (j - 1) % 3 + 1
            t[m] = t[m] - (tonumber(vals[j]) or 0)
          end
          call('HDEL', h, unpack(fields))
          call('ZREMRANGEBYSCORE', z, '-inf', '(' .. fmt(lo))
          for m = 1, 3 do
            V[3 + m] = fmt(t[m])
            S[n + 1] = M[m]; S[n + 2] = V[3 + m]; n = n + 2
          end
        end
        local first = call('ZRANGE', z, 0, 0)
        if first[1] then
          V[7] = fmt(tonumber(first[1]))
          S[n + 1] = 'o'; S[n + 2] = V[7]; n = n + 2
        else
          call('HDEL', h, 'o')
          V[7] = false
        end
        -- written at once, whatever becomes of the charge: the ageing is true of the window already
        if n > n0 then call('HSET', h, unpack(S, n0 + 1, n)); n = n0 end
      end
    elseif ttl then                   -- V[1] is the last TTL refresh ('x'), then as below
      ki = ki + 1
      if lit > 0 then
        V = call('HMGET', h, 'x', 't', 'c', 'r', unpack(A, x, x + nn - 1))
      else
        V = call('HMGET', h, 'x', unpack(A, x, x + nn - 1))
      end
      d, fb, ai = 1, x - 2 - lit, 1 + 3 * nc
      if charging then
        local last = V[1]
        if not last or now - last >= slack(ttl) * 1000 or now < last + 0 then
          refresh = fmt(ttl + slack(ttl))
          S[n + 1] = 'x'; S[n + 2] = nows; n = n + 2
        end
      end
    else
      ki = ki + 1
      if lit > 0 then
        V = call('HMGET', h, 't', 'c', 'r', unpack(A, x, x + nn - 1))
      else
        V = call('HMGET', h, unpack(A, x, x + nn - 1))
      end
      d, fb, ai = 0, x - 1 - lit, 3 * nc
    end
    x = x + nn
    for c = d, d + 3 * nc - 3, 3 do
      local o1, o2, m1, m2 = sbyte(shape, k, k + 3)
      k = k + 4
      local o, nlc = o1 * 256 + o2, m1 * 256 + m2   -- result position, limits on this counter
      if charging then
        local f1, f2, f3 = 't', 'c', 'r'
        if c - d >= lit then f1, f2, f3 = A[fb + c + 1], A[fb + c + 2], A[fb + c + 3] end
        -- new totals: written (and formatted, fmt() inlined) only where the amount is not 0
        local v1, v2, v3 = (V[c + 1] or 0) + a1, (V[c + 2] or 0) + a2, (V[c + 3] or 0) + a3
        if v1 > MAXN or v2 > MAXN or v3 > MAXN then   -- refused after the loop: nothing written
          over = over or o + (v1 > MAXN and 0 or v2 > MAXN and 1 or 2)
        end
        local s
        if a1 ~= 0 then s = sformat('%d', v1); S[n + 1] = f1; S[n + 2] = s; n = n + 2
        else s = V[c + 1] or '0' end
        out[o] = s
        if a2 ~= 0 then s = sformat('%d', v2); S[n + 1] = f2; S[n + 2] = s; n = n + 2
        else s = V[c + 2] or '0' end
        out[o + 1] = s
        if a3 ~= 0 then s = sformat('%d', v3); S[n + 1] = f3; S[n + 2] = s; n = n + 2
        else s = V[c + 3] or '0' end
        out[o + 2] = s
        if z then                     -- the window's counter: its current bucket
          local new = not V[8]
          if new then
            zadd = bk
            if ttl then                 -- once per bucket (see above)
              zttl = ttl
              refresh = ttl
            end
            local oldest = V[7]
            if not oldest or b < oldest + 0 then S[n + 1] = 'o'; S[n + 2] = bk; n = n + 2 end
            S[n + 1] = 'k'; S[n + 2] = bk; n = n + 2
          end
          if a1 ~= 0 or new then
            S[n + 1] = 'kt'; S[n + 2] = sformat('%d', (V[1] or 0) + a1); n = n + 2
          end
          if a2 ~= 0 or new then
            S[n + 1] = 'kc'; S[n + 2] = sformat('%d', (V[2] or 0) + a2); n = n + 2
          end
          if a3 ~= 0 or new then
            S[n + 1] = 'kr'; S[n + 2] = sformat('%d', (V[3] or 0) + a3); n = n + 2
          end
        end
        for _ = 1, nlc do
          ai = ai + 1
          local i1, i2, m, t1, t2, t3, t4, t5, t6, t7 = sbyte(shape, k, k + 9)
          k = k + 10
          local after, st = v1, V[ai]
          if m == 2 then after = v2 elseif m == 3 then after = v3 end
          local first = ((((t1 * 256 + t2) * 256 + t3) * 256 + t4) * 256 + t5) * 65536 + t6 * 256 + t7
          -- No state set and below the first threshold: nothing re-arms, nothing fires.
          if (st and st ~= '0') or after >= first then
            local li = i1 * 256 + i2
            local c0 = cold + 28 * li
            local crit, warn = big(c0), big(c0 + 7) - 1
            if crit < 1 then crit = 1 end
            local s0 = st and st + 0 or 0
            local ns = s0
            local before = after - amt[m]
            if ns % 2 == 1 and before < big(c0 + 14) - 1 then ns = ns - 1 end
            if ns >= 2 and before < big(c0 + 21) then ns = ns - 2 end
            if warn >= 0 and ns % 2 == 0 and after >= warn then
              ns = ns + 1; fired[nfired + 1] = li; fired[nfired + 2] = 1; nfired = nfired + 2
            end
            if ns < 2 and after >= crit then
              ns = ns + 2; fired[nfired + 1] = li; fired[nfired + 2] = 2; nfired = nfired + 2
            end
            if ns ~= s0 then
              V[ai] = ns
              S[n + 1] = A[fb + ai]; S[n + 2] = fmt(ns); n = n + 2
            end
          elseif not st then
            -- A missing field costs HMGET a scan of the whole hash (a listpack is searched from its
            -- head), which would make a long window slower than a short one: the state is written as
            -- '0' once, on a new hash's first charge right behind its totals.
            S[n + 1] = A[fb + ai]; S[n + 2] = '0'; n = n + 2
          end
        end
      else
        out[o], out[o + 1], out[o + 2] = V[c + 1] or '0', V[c + 2] or '0', V[c + 3] or '0'
        ids[(o + 2) / 3] = h .. '|' .. (c - d >= lit and string.sub(A[fb + c + 1], 1, -2) or '')
        for _ = 1, nlc do
          local i1, i2, m = sbyte(shape, k, k + 2)
          k = k + 10
          local li = i1 * 256 + i2
          lims[li] = {p = o + m - 1, v = big(cold + 28 * li), z = z, h = h, bs = bs, w = w, t = ttl}
        end
      end
    end
    if n > n0 then
      W[nw + 1], W[nw + 2], W[nw + 3] = h, n0 + 1, n
      nw = nw + 3
    end
    if refresh or zadd then
      X = X or {}
      X[nx + 1], X[nx + 2], X[nx + 3], X[nx + 4], X[nx + 5] = h, refresh or false, z, zadd, zttl
      nx = nx + 5
    end
  end
  if over then return nil, over end  -- the totals position of the first counter that would overflow
  for j = 1, nw, 3 do call('HSET', W[j], unpack(S, W[j + 1], W[j + 2])) end
  for j = 1, nx, 5 do
    local z, bk = X[j + 2], X[j + 3]
    if X[j + 1] then call('PEXPIRE', X[j], X[j + 1]) end
    if bk then
      call('ZADD', z, bk, bk)
      if X[j + 4] then call('PEXPIRE', z, X[j + 4]) end
    end
  end
  return out, fired, ids, lims
end

-- The call's amounts, ARGV[2..4] (tokens, nano-USD, requests), as numbers.
local function amounts()
  return {ARGV[2] + 0, ARGV[3] + 0, ARGV[4] + 0}
end
