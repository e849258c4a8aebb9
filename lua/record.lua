-- record.lua: charge actual usage to every counter of the plan, unconditionally (money spent is
-- never dropped), and decide alert crossings in the same step. Limits are not enforced here: the
-- client reads the new totals and raises BudgetExceededError for any limit now exceeded.
-- KEYS: [1..] the plan's counter keys (without the holds hash and leases: record never touches
--       them), then the tree's alert stream, its ledger stream, then the request key when ARGV[5]
--       is set
-- ARGV: [1] clock µs or '' (server TIME), [2] tokens, [3] nano-USD, [4] requests,
--       [5] request-id TTL ms or '', [6] unused, [7] alert metadata JSON, [8..] the plan
--       (see include/scan.lua), then the ledger's MAXLEN and the ledger entry JSON ('' for none)
-- include: args, clock, scan, request, alerts, ledger
-- Returns one string (a reply of one bulk string is the cheapest to build):
--   "0|<now µs>|<tokens cost requests per counter, space-separated>|<limit index, level, ...>|||<alert ids>|<ledger id>"
--   or "1|<now µs>|||<µs> <tokens> <cost>" when the request id was already charged
--   or "2|<now µs>|<totals position>" when the charge would push that counter past 2^53 - 1
--   (refused: nothing written)
--   (alerts in any order: parse_charge sorts them by limit, then level)
local bad = bad_args()
if bad then return redis.error_reply(bad) end
local now = now_us()
local nows = fmt(now)
local prev = seen_request()
if prev then return '1|' .. nows .. '|||' .. prev end
local totals, fired = scan(now, amounts(), true, 1, nows)
if not totals then return '2|' .. nows .. '|' .. fired end  -- a counter would pass 2^53: nothing written
remember_request(nows)
return '0|' .. nows .. '|' .. table.concat(totals, ' ') .. '|' .. table.concat(fired, ' ') .. '|||'
  .. fan_out(nows, totals, fired) .. '|' .. ledger(nows)
