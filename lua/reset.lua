-- reset.lua: zero counters of one scope and append the reset to the tree's ledger, in one step.
-- Holds are left alone (in-flight reservations still hold); alert states live in the cleared
-- hashes' fields, so every threshold re-arms.
-- KEYS: [1] the tree's ledger stream, [2] the hash whose amounts the reset reports (the session
--       hash for 'session', the scope's totals hash for 'model' and 'scope'), [3..] keys deleted
--       with it (windows and their bucket sets, the session)
-- ARGV: [1] clock µs or '', [2] 'session' | 'model' | 'scope', [3] the model's field prefix
--       ('model': only those fields of KEYS[2] are deleted), [4] ledger MAXLEN, [5] ledger entry
--       JSON ('' for none)
-- include: clock, num
-- Returns "<tokens> <cost> <requests>|<ledger id>": what the reported counter held.
local now = now_us()
local amt
if ARGV[2] == 'model' then
  local p = ARGV[3]
  local flat = redis.call('HGETALL', KEYS[2])
  local drop = {}
  amt = {0, 0, 0}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if string.sub(f, 1, #p) == p then
      drop[#drop + 1] = f
      local rest = string.sub(f, #p + 1)
      for m = 1, 3 do
        if rest == M[m] then amt[m] = flat[i + 1] + 0 end
      end
    end
  end
  if #drop > 0 then redis.call('HDEL', KEYS[2], unpack(drop)) end
  if #KEYS > 2 then redis.call('DEL', unpack(KEYS, 3)) end
else
  local v = redis.call('HMGET', KEYS[2], 't', 'c', 'r')
  amt = {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0}
  redis.call('DEL', unpack(KEYS, 2))
end
local id = ''
if ARGV[5] ~= '' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'd', ARGV[5], 'ts', fmt(now),
                  't', fmt(amt[1]), 'c', fmt(amt[2]), 'r', fmt(amt[3]))
end
return fmt(amt[1]) .. ' ' .. fmt(amt[2]) .. ' ' .. fmt(amt[3]) .. '|' .. id
