-- refusal.lua: a refusal is an event. Counted per scope and limit in the atomic step that refused
-- the call; the first refusal of a limit in each of its windows (a rolling window's length, a
-- session, a calendar period, until a reset) fires a REFUSED alert, once across the fleet; each
-- counted refusal is appended to the tree's ledger (kind "refusal": its amounts 0, the tokens the
-- call asked for in its JSON).
-- needs: num, tail, announce, ledger
--
-- The refusal's four arguments end the script's ARGV: '1' to count this refusal ('' not: an attempt
-- of acquire() that will try again), the plan's alert metadata, then the ledger's MAXLEN and the
-- entry's head (the JSON without the limit; '' for no ledger). A limit's metadata row names the
-- field of its armed state in its counter's hash (row[8]: the time it fired, µs) and the KEYS index
-- of its scope's totals hash (row[9]), whose field 'n:<limit type>' counts its refusals (cumulative
-- until the scope's reset). `lim` is the limit as scan() read it, `used` used + held + this.
-- Returns the alert's stream id ('' when none fired).
local function refuse(li, lim, used, now)
  if ARGV[#ARGV - 3] ~= '1' then return '' end
  local meta = cjson.decode(ARGV[#ARGV - 2])
  local row = meta.l[li]
  local nows = fmt(now)
  redis.call('HINCRBY', KEYS[row[9]], 'n:' .. row[2], 1)
  local fired = redis.call('HGET', lim.h, row[8])
  local id = ''
  if not fired or (lim.w and now - fired >= lim.w) then
    redis.call('HSET', lim.h, row[8], nows)
    -- a counter's hash made by this field (no charge yet) expires as its charges would make it
    if lim.t and redis.call('PTTL', lim.h) == -1 then redis.call('PEXPIRE', lim.h, lim.t) end
    id = announce(meta, row, 'refused', fmt(used), nows)
  end
  ledger(nows, ',"limit_scope":' .. cjson.encode(row[1]) .. ',"limit_type":' .. cjson.encode(row[2]) .. '}')
  return id
end
