-- release.lua: free a reservation's hold without charging anything; a hold whose `with` block was
-- left without a commit is also written to the ledger in the same step (kind "released_uncommitted":
-- it counts against nothing).
-- KEYS: [1] holds hash, [2] leases zset, [3] the tree's ledger stream (with a ledger entry only)
-- ARGV: [1] clock µs or '', [2..4] the amounts held, [5] unused, [6] hold id, [7] unused,
--       [8] the ledger's MAXLEN, [9] the ledger entry JSON ('' or absent: none)
-- include: clock, holds
-- Returns: 1 if the hold was live, 0 if it had already expired, been committed or released
local found = drop_hold(ARGV[6])
local entry = ARGV[9]
if entry and entry ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'd', entry, 'ts', fmt(now_us()), 't', ARGV[2],
             'c', ARGV[3], 'r', ARGV[4])
end
return found and 1 or 0
