-- args.lua: the arguments a write could fail on, checked before a script's first write (Redis never
-- rolls a script's earlier writes back). The client checks them too (distbudget/_core/bounds.py);
-- this guards any other caller. Durations: 1 ms to 10 years; amounts and clock up to 2^53 - 1.

local EXACT = 9007199254740991

local function whole(s, lo, hi)
  local v = tonumber(s)
  return v ~= nil and v == math.floor(v) and v >= lo and v <= hi
end

-- The clock (ARGV[1]), the amounts (ARGV[2..4]), the request id's TTL in ms (ARGV[5]) and, when
-- `lease` is given, a lease TTL in µs at ARGV[lease]. Returns an error message, or nil.
local function bad_args(lease)
  if ARGV[1] ~= '' and not whole(ARGV[1], 0, EXACT) then return 'distbudget: invalid clock' end
  for k = 2, 4 do
    if not whole(ARGV[k], 0, EXACT) then return 'distbudget: invalid amounts' end
  end
  if ARGV[5] ~= '' and not whole(ARGV[5], 1, 315360000000) then return 'distbudget: invalid request TTL' end
  if lease and not whole(ARGV[lease], 1000, 315360000000000) then return 'distbudget: invalid lease TTL' end
  return nil
end
