-- extend.lua: keep a live hold held longer: its lease now ends ARGV[3] µs from now (a long call, a
-- stream). A hold whose lease already ended is not revived (its commit will be flagged hold_expired).
-- KEYS: [1] holds hash, [2] leases zset
-- ARGV: [1] clock µs or '', [2] hold id, [3] the new lease TTL in µs (1 ms .. 10 years)
-- Returns: 1 if the hold was live (extended), 0 if not
if not whole(ARGV[3], 1000, 315360000000000) or (ARGV[1] ~= '' and not whole(ARGV[1], 0, MAXN)) then
  return redis.error_reply('distbudget: invalid lease TTL')
end
local now = now_us()
local lease = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not lease or tonumber(lease) <= now then return 0 end
local ttl_us = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], fmt(now + ttl_us), ARGV[2])
local ttl_ms = math.ceil(ttl_us / 1000) + 1000
for k = 1, 2 do
  if redis.call('PTTL', KEYS[k]) < ttl_ms then redis.call('PEXPIRE', KEYS[k], fmt(ttl_ms)) end
end
return 1
