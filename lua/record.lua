-- record.lua: charge actual usage to every counter of the plan, unconditionally (money spent is
-- never dropped), and decide alert crossings in the same step. Limits are not enforced here: the
-- client reads the new totals and raises BudgetExceededError for any limit now exceeded.
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys,
--       [#KEYS] the request key when ARGV[5] is set
-- ARGV: [1] clock µs or '' (server TIME), [2] tokens, [3] nano-USD, [4] requests,
--       [5] request-id TTL ms or '', [6], [7] unused, [8..] the plan (see _common.lua)
-- Returns: {0, now µs, {tokens, cost, requests per counter}, {limit index, level, ...}, ''}
--       or {1, now µs, {}, {}, "<µs> <tokens> <cost>"} when the request id was already charged
local now = now_us()
local prev = seen_request()
if prev then return {1, now, {}, {}, prev} end
local amt = amounts()
local counters, limits, order = prepare(now)
for _, c in ipairs(counters) do charge(c, amt) end
local fired = alerts(limits, amt)
flush(order)
remember_request(now, amt)
return {0, now, totals(counters), fired, ''}
