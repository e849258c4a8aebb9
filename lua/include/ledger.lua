-- ledger.lua: the usage ledger entry of a charge (or of a refusal).
-- needs: tail
--
-- The usage ledger, in the same atomic step as the charge: ARGV[#ARGV] is the entry's JSON (see
-- distbudget/_core/ledger.py; '' when the budget keeps no ledger), ARGV[#ARGV - 1] the stream's
-- approximate MAXLEN; the amounts are ARGV[2..4] as the client sent them (decimal integers).
-- A refusal's entry (`rest`: the end of its JSON, which only the script knows) charged nothing: its
-- amounts are 0, so the ledger's amounts always sum to what was charged.
-- Returns the entry id ('' without a ledger).
local function ledger(nows, rest)
  local entry = ARGV[#ARGV]
  if entry == '' then return '' end
  local t, c, r = ARGV[2], ARGV[3], ARGV[4]
  if rest then t, c, r = '0', '0', '0' end
  return redis.call('XADD', tail_key(0), 'MAXLEN', '~', ARGV[#ARGV - 1], '*', 'd', entry .. (rest or ''), 'ts',
                    nows, 't', t, 'c', c, 'r', r)
end
