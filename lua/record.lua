-- record.lua: charge actual usage to every counter of the plan, unconditionally (money spent is
-- never dropped), and decide alert crossings in the same step. Limits are not enforced here: the
-- client reads the new totals and raises BudgetExceededError for any limit now exceeded.
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys, then the tree's alert
--       stream, then the request key when ARGV[5] is set
-- ARGV: [1] clock µs or '' (server TIME), [2] tokens, [3] nano-USD, [4] requests,
--       [5] request-id TTL ms or '', [6] unused, [7] alert metadata JSON, [8..] the plan
--       (see _common.lua)
-- Returns one string (a reply of one bulk string is the cheapest to build):
--   "0|<now µs>|<tokens cost requests per counter, space-separated>|<limit index, level, ...>|||<alert ids>"
--   or "1|<now µs>|||<µs> <tokens> <cost>" when the request id was already charged
--   (alerts in any order: parse_charge sorts them by limit, then level)
local now = now_us()
local prev = seen_request()
if prev then return '1|' .. fmt(now) .. '|||' .. prev end
local amt = amounts()
local totals, fired = scan(now, amt, true)
remember_request(now, amt)
return '0|' .. fmt(now) .. '|' .. table.concat(totals, ' ') .. '|' .. table.concat(fired, ' ') .. '|||'
  .. fan_out(now, totals, fired)
