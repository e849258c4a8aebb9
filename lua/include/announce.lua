-- announce.lua: one alert published in the atomic step that decided it: appended to the tree's
-- capped alert stream (tail_key(1)) and PUBLISHed on the all-scopes and the scope's channel.
-- needs: tail
--
-- `meta` is the plan's alert metadata (see distbudget/engines/codec.py alert_meta; meta.n: the
-- stream's cap), `row` its row of the limit, `used` the usage shown (a decimal string). The alert
-- names the limit's scope and the call that drove it (requested_by: the requesting scope, its
-- session and model). Returns the stream id.
local function announce(meta, row, level, used, nows)
  local alert = {scope = row[1], limit_type = row[2], metric = row[3], limit = row[4], used = used,
                 level = level, session_id = meta.s, model = meta.m, ts_us = nows,
                 requested_by = {scope = meta.r, session_id = meta.s, model = meta.m}}
  local limit = tonumber(row[4])
  alert.pct = limit > 0 and tonumber(used) / limit or 0
  local stream = tail_key(1)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', meta.n, '*', 'alert', cjson.encode(alert))
  alert.id = id
  alert.stream = stream
  local msg = cjson.encode(alert)
  redis.call('PUBLISH', meta.all, msg)
  redis.call('PUBLISH', row[6], msg)
  return id
end
