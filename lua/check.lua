-- check.lua: would a call be admitted now (used + held + this <= value for every limit)?
-- Records nothing (it only ages out expired buckets and leases, which changes no total).
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys
-- ARGV: [1] clock µs or '', [2] tokens, [3] nano-USD, [4] requests, [5..7] '', [8..] the plan
-- include: clock, scan, holds_read, admit
-- Returns: {0 admitted | 1 refused, now µs, used: "tokens cost requests ..." (3 per counter),
--           {held, 3 per counter}, refusing limit index (0 none),
--           µs until a rolling window frees enough (-1: never)}
local now = now_us()
reap(now)
local amt = amounts()
local totals, _, ids, lims = scan(now, amt, false)
local held = read_held(ids)
local refused, retry = admit(lims, totals, held, amt, now)
if refused > 0 then return {1, now, table.concat(totals, ' '), held, refused, retry} end
return {0, now, table.concat(totals, ' '), held, 0, -1}
