-- alerts.lua: alert fan-out (stream + pub/sub) of the crossings a charge decided.
-- needs: tail
--
-- Alert fan-out, in the same atomic step as the crossing (and only when something fired): append
-- each alert to the tree's capped stream and PUBLISH it on the all-scopes and the scope channel.
-- ARGV[7] is the plan's alert metadata (JSON, see distbudget/engines/codec.py alert_meta; meta.n: the
-- stream's cap, Budget(alert_stream_maxlen=)); the stream key is tail_key(1). Returns the stream ids.
local function fan_out(nows, totals, fired)
  if #fired == 0 or ARGV[7] == '' then return '' end
  local meta = cjson.decode(ARGV[7])
  local stream = tail_key(1)
  local ids = {}
  for k = 1, #fired, 2 do
    local l = meta.l[fired[k]]
    local alert = {scope = l[1], limit_type = l[2], metric = l[3], limit = l[4], used = totals[l[5]],
                   level = fired[k + 1] == 1 and l[7] or 'critical', session_id = meta.s,
                   model = meta.m, ts_us = nows}
    local limit = tonumber(l[4])
    alert.pct = limit > 0 and tonumber(alert.used) / limit or 0
    local id = redis.call('XADD', stream, 'MAXLEN', '~', meta.n, '*', 'alert', cjson.encode(alert))
    alert.id = id
    alert.stream = stream
    local msg = cjson.encode(alert)
    redis.call('PUBLISH', meta.all, msg)
    redis.call('PUBLISH', l[6], msg)
    ids[#ids + 1] = id
  end
  return table.concat(ids, ' ')
end
