-- request.lua: request ids: a request id is charged at most once.
--
-- Idempotency: KEYS[#KEYS] is the request key when ARGV[5] (its TTL in ms) is set.
local function seen_request()
  if ARGV[5] == '' then return nil end
  return redis.call('GET', KEYS[#KEYS])
end

local function remember_request(nows)
  if ARGV[5] == '' then return end
  redis.call('SET', KEYS[#KEYS], nows .. ' ' .. ARGV[2] .. ' ' .. ARGV[3], 'PX', ARGV[5])
end
