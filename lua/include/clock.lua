-- clock.lua: the time of the call, in µs: ARGV[1] when a test injects a clock, else the server's
-- TIME (never a worker's clock: workers' clocks disagree).

local function now_us()
  if ARGV[1] ~= '' then
    return tonumber(ARGV[1])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
