-- tail.lua: the keys at the end of a charge script's KEYS.
--
-- The charge scripts' KEYS end with the tree's alert stream, its ledger stream and, when ARGV[5]
-- (the request id's TTL) is set, the request key: tail_key(0) is the ledger, tail_key(1) the alerts.
local function tail_key(back)
  return KEYS[#KEYS - back - (ARGV[5] ~= '' and 1 or 0)]
end
