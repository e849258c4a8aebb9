-- reserve.lua: admit a call iff, for every limit, used + held + this <= value; if admitted, hold
-- `this` on every counter of the plan under a lease that expires by itself (a worker that dies
-- while holding loses its hold after the TTL; expired leases are reaped here, amortised O(1)).
-- A refusal holds nothing; it is counted, may fire the limit's REFUSED alert and is appended to the
-- ledger (refusal.lua).
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys, then the tree's alert
--       stream and its ledger stream
-- ARGV: [1] clock µs or '', [2] tokens, [3] nano-USD, [4] requests (the worst case to hold),
--       [5] '', [6] hold id, [7] lease TTL µs, [8..] the plan (see distbudget/engines/codec.py),
--       then the refusal's four (see refusal.lua)
-- include: args, admit
-- Returns: {0 admitted | 1 refused, now µs, used: "tokens cost requests ..." (3 per counter),
--           {held, 3 per counter, before this hold}, refusing limit index (0 none),
--           µs until a rolling window frees enough (-1: never), the REFUSED alert's stream id ('': none)}
local bad = bad_args(7)
if bad then return redis.error_reply(bad) end
local now, amt, ids, used, held, refusal = admission()
if refusal then return refusal end
local ttl_us = tonumber(ARGV[7])
local lines = {fmt(amt[1]) .. ' ' .. fmt(amt[2]) .. ' ' .. fmt(amt[3]) .. ' ' .. fmt(now + ttl_us)}
for _, id in ipairs(ids) do
  lines[#lines + 1] = id
  for m = 1, 3 do
    if amt[m] ~= 0 then redis.call('HINCRBY', KEYS[1], id .. '|' .. M[m], fmt(amt[m])) end
  end
end
redis.call('HSET', KEYS[1], ARGV[6], table.concat(lines, '\n'))
redis.call('ZADD', KEYS[2], fmt(now + ttl_us), ARGV[6])
local ttl_ms = math.ceil(ttl_us / 1000) + 1000
for k = 1, 2 do
  if redis.call('PTTL', KEYS[k]) < ttl_ms then redis.call('PEXPIRE', KEYS[k], fmt(ttl_ms)) end
end
return {0, now, used, held, 0, -1, ''}
