-- extend.lua: keep a live hold held longer (a long call, a stream): its lease now ends ARGV[7] µs
-- from now, in one step. A hold whose lease already ended is not revived (its commit is then flagged
-- hold_expired).
-- KEYS: [1] holds hash, [2] leases zset
-- ARGV: [1] clock µs or '', [2..4] '0', [5] '', [6] hold id, [7] the new lease TTL in µs (1 ms .. 10 years)
-- include: args, clock
-- Returns: 1 if the hold was live (extended), 0 if not
local bad = bad_args(7)
if bad then return redis.error_reply(bad) end
local now = now_us()
local lease = redis.call('ZSCORE', KEYS[2], ARGV[6])
if not lease or tonumber(lease) <= now then return 0 end
local ttl_us = tonumber(ARGV[7])
redis.call('ZADD', KEYS[2], string.format('%d', now + ttl_us), ARGV[6])
local ttl_ms = math.ceil(ttl_us / 1000) + 1000
for k = 1, 2 do
  if redis.call('PTTL', KEYS[k]) < ttl_ms then redis.call('PEXPIRE', KEYS[k], string.format('%d', ttl_ms)) end
end
return 1
