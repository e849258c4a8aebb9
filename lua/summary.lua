-- summary.lua: read every counter of a plan (used and held) and the scope's totals hash.
-- Ages out expired buckets and leases first, which changes no live total.
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys
-- ARGV: [1] clock µs or '', [2..4] 0 (no amounts), [5] KEYS index of the scope's totals hash,
--       [6..7] unused, [8..] the plan (see include/scan.lua)
-- include: clock, scan, holds_read
-- Returns: {now µs, used: "tokens cost requests ..." (3 per counter), {held, 3 per counter},
--           the totals hash as field, value, ...}
local now = now_us()
reap(now)
local totals, _, ids = scan(now, amounts(), false)
local held = read_held(ids)
return {now, table.concat(totals, ' '), held, redis.call('HGETALL', KEYS[tonumber(ARGV[5])])}
