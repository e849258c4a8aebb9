-- alerts.lua: alert fan-out of the crossings a charge decided.
-- needs: announce
--
-- Alert fan-out, in the same atomic step as the crossing (and only when something fired): each
-- alert announced (announce.lua). ARGV[7] is the plan's alert metadata (JSON, see
-- distbudget/engines/codec.py alert_meta). Returns the stream ids.
local function fan_out(nows, totals, fired)
  if #fired == 0 or ARGV[7] == '' then return '' end
  local meta = cjson.decode(ARGV[7])
  local ids = {}
  for k = 1, #fired, 2 do
    local l = meta.l[fired[k]]
    ids[#ids + 1] = announce(meta, l, fired[k + 1] == 1 and l[7] or 'critical', totals[l[5]], nows)
  end
  return table.concat(ids, ' ')
end
