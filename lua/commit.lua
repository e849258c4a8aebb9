-- commit.lua: settle a reservation: free its hold and charge the actual usage, in one step.
-- Actual usage above the hold is charged all the same. A hold that already expired (or was
-- released) does not stop the charge: the money was spent.
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys, then the tree's alert
--       stream, its ledger stream, then the request key when ARGV[5] is set
-- ARGV: [1] clock µs or '', [2] tokens, [3] nano-USD, [4] requests, [5] request-id TTL ms or '',
--       [6] hold id, [7] alert metadata JSON, [8..] the plan (see include/scan.lua), then the ledger's
--       MAXLEN and the ledger entry JSON ('' for none)
-- include: args, clock, scan, holds, request, alerts, ledger
-- Returns one string, like record.lua's with the hold's fate:
--   "0|<now µs>|<tokens cost requests per counter>|<limit index, level, ...>||<hold found 1/0>|<alert ids>|<ledger id>"
--   or "1|<now µs>|||<µs> <tokens> <cost>|0" when the request id was already charged
--   or "2|<now µs>|<totals position>" when the charge would push that counter past 2^53 - 1
--   (refused before anything was written: the hold stays held)
local bad = bad_args()
if bad then return redis.error_reply(bad) end
local now = now_us()
local nows = fmt(now)
local prev = seen_request()
if prev then
  drop_hold(ARGV[6])
  return '1|' .. nows .. '|||' .. prev .. '|0'
end
local lease = redis.call('ZSCORE', KEYS[2], ARGV[6])
local totals, fired = scan(now, amounts(), true, 3, nows)
if not totals then return '2|' .. nows .. '|' .. fired end  -- refused: nothing written, the hold held
-- found: the hold was live (a lease that ended but was not reaped yet is not)
local found = (drop_hold(ARGV[6]) and lease and tonumber(lease) > now) and '1' or '0'
remember_request(nows)
return '0|' .. nows .. '|' .. table.concat(totals, ' ') .. '|' .. table.concat(fired, ' ') .. '||'
  .. found .. '|' .. fan_out(nows, totals, fired) .. '|' .. ledger(nows)
