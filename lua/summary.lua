-- summary.lua: read every counter of a plan (used and held), the scope's totals hash and each
-- limit's refusals. Ages out expired buckets and leases first, which changes no live total.
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys
-- ARGV: [1] clock µs or '', [2..4] 0 (no amounts), [5] KEYS index of the scope's totals hash,
--       [6] unused, [7] the plan's alert metadata (its rows name each limit's count, refusal.lua),
--       [8..] the plan (see distbudget/engines/codec.py)
-- include: clock, scan, holds_read
-- Returns: {now µs, used: "tokens cost requests ..." (3 per counter), {held, 3 per counter},
--           the totals hash as field, value, ..., refusals: "n ..." (one per limit, plan order)}
local now = now_us()
reap(now)
local totals, _, ids = scan(now, amounts(), false)
local held = read_held(ids)
local counts = {}
for li, row in ipairs(cjson.decode(ARGV[7]).l) do
  counts[li] = redis.call('HGET', KEYS[row[9]], 'n:' .. row[2]) or '0'
end
return {now, table.concat(totals, ' '), held, redis.call('HGETALL', KEYS[tonumber(ARGV[5])]),
        table.concat(counts, ' ')}
