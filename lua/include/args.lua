-- args.lua: the arguments a write could fail on, checked before a script's first write (Redis never
-- rolls a script's earlier writes back): the request id's TTL in ms (ARGV[5], for SET PX at the
-- end of a charge) and a lease TTL in µs; both from 1 ms to 10 years. A clock or amount that is not
-- a number fails in the arithmetic before any write; their ranges are the client's to check
-- (distbudget/_core/bounds.py), which also checks these.

local function whole(s, lo, hi)
  local v = tonumber(s)
  return v ~= nil and v == math.floor(v) and v >= lo and v <= hi
end

-- An error message, or nil. `lease`: the ARGV index of a lease TTL, if the script takes one.
local function bad_args(lease)
  if ARGV[5] ~= '' and not whole(ARGV[5], 1, 315360000000) then return 'distbudget: invalid request TTL' end
  if lease and not whole(ARGV[lease], 1000, 315360000000000) then return 'distbudget: invalid lease TTL' end
  return nil
end
