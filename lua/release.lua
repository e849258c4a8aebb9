-- release.lua: free a reservation's hold without charging anything.
-- KEYS: [1] holds hash, [2] leases zset
-- ARGV: [1..5] unused, [6] hold id
-- include: holds
-- Returns: 1 if the hold was live, 0 if it had already expired, been committed or released
return drop_hold(ARGV[6]) and 1 or 0
