-- check.lua: would a call be admitted now (used + held + this <= value for every limit)?
-- Changes no total (it only ages out expired buckets and leases); a refusal is counted, may fire the
-- limit's REFUSED alert and is appended to the ledger (refusal.lua).
-- KEYS: [1] holds hash, [2] leases zset, [3..] the plan's counter keys, then the tree's alert
--       stream and its ledger stream
-- ARGV: [1] clock µs or '', [2] tokens, [3] nano-USD, [4] requests, [5..7] '', [8..] the plan,
--       then the refusal's four (see refusal.lua)
-- include: admit
-- Returns: {0 admitted | 1 refused, now µs, used: "tokens cost requests ..." (3 per counter),
--           {held, 3 per counter}, refusing limit index (0 none),
--           µs until a rolling window frees enough (-1: never), the REFUSED alert's stream id ('': none)}
local now, _, _, used, held, refusal = admission()
return refusal or {0, now, used, held, 0, -1, ''}
