-- ledger.lua: the usage ledger entry of a charge (or of a refusal).
-- needs: tail
--
-- The usage ledger, in the same atomic step as the charge: ARGV[#ARGV] is the entry's JSON (see
-- distbudget/_core/ledger.py; '' when the budget keeps no ledger), ARGV[#ARGV - 1] the stream's
-- approximate MAXLEN; the amounts are ARGV[2..4] as the client sent them (decimal integers).
-- `rest` (a refusal's): the end of the entry's JSON, which only the script knows.
-- Returns the entry id ('' without a ledger).
local function ledger(nows, rest)
  local entry = ARGV[#ARGV]
  if entry == '' then return '' end
  return redis.call('XADD', tail_key(0), 'MAXLEN', '~', ARGV[#ARGV - 1], '*', 'd', entry .. (rest or ''), 'ts',
                    nows, 't', ARGV[2], 'c', ARGV[3], 'r', ARGV[4])
end
