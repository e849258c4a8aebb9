-- check.lua: would a call be admitted now (used + held + this <= value for every limit)?
-- Records nothing (it only ages out expired buckets and leases, which changes no total).
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys
-- ARGV: [1] clock µs or '', [2] tokens, [3] nano-USD, [4] requests, [5..7] '', [8..] the plan
-- Returns: {0 admitted | 1 refused, now µs, used per counter, held per counter,
--           refusing limit index (0 none), µs until a rolling window frees enough (-1: never)}
local now = now_us()
reap(now)
local amt = amounts()
local counters, limits, order = prepare(now)
flush(order)
local held = read_held(counters)
local refused, retry = admit(limits, amt, now)
if refused > 0 then return {1, now, totals(counters), held, refused, retry} end
return {0, now, totals(counters), held, 0, -1}
