-- holds.lua: reservations' holds. KEYS[1] maps a hold id to "tokens cost requests\n<counter id>\n..."
-- and each "<counter id>|<metric>" to the amount held on that counter; KEYS[2] orders hold ids by
-- expiry. A counter id is "<hash key>|<field prefix>". drop_hold frees one hold.
-- needs: num

local function drop_hold(id)
  local v = redis.call('HGET', KEYS[1], id)
  if not v then return false end
  local amt = nil
  for line in string.gmatch(v, '[^\n]+') do
    if not amt then
      amt = {}
      for n in string.gmatch(line, '%d+') do amt[#amt + 1] = tonumber(n) end
    else
      for m = 1, 3 do
        if amt[m] ~= 0 then
          local f = line .. '|' .. M[m]
          if redis.call('HINCRBY', KEYS[1], f, fmt(-amt[m])) <= 0 then
            redis.call('HDEL', KEYS[1], f)
          end
        end
      end
    end
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  return true
end
