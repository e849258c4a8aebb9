-- registry.lua: the shared scope registry, one hash: scope name -> its config JSON, whose
-- "parent" is the parent scope's name or null. Parents are fixed: a scope's parent must be
-- registered before it (or in the same call), cannot change while it is registered, and a scope
-- with children cannot be removed; so trees (and their Cluster hash tags) never change under
-- running workers.
-- KEYS: [1] the registry hash
-- ARGV: [1] 'put' | 'chain' | 'remove' | 'swap'; 'chain' and 'remove': [2] scope name; 'put': triples
--       (name, config JSON, mode) from the root down, mode 'w' (write) or 'a' (only if absent):
--       every triple is checked before any is written (all or nothing); 'swap' (an update, see
--       distbudget/_core/update.py): [2] name, [3] the config read, [4] the config to write if the
--       stored one is still the one read
-- Returns: 'put' and 'chain': the configs of the (last) scope, its parent, ... up to the root ({}
--   when the scope is unknown); 'remove': {'ok'} or {} when unknown;
--   'swap': the chain as for 'chain' when written, {'changed'} when the stored config is no longer
--   the one read, {} when unknown. A refusal: {'err', reason, name}
--   with reason 'missing' (parent not registered), 'reparent' (parent differs from the
--   registered one: name is the registered parent or '' for a root), 'cycle', 'depth', 'children'.
local MAX_DEPTH = 16
local reg, op = KEYS[1], ARGV[1]
local pending = {}  -- 'put': configs checked, not yet written

local function get(n)
  return pending[n] or redis.call('HGET', reg, n)
end

local function parent_of(cfg)
  local p = cjson.decode(cfg).parent
  if p == cjson.null then return nil end
  return p
end

local function chain(from)
  local out, n = {}, from
  while n do
    local cfg = get(n)
    if not cfg then return out, n end
    out[#out + 1] = cfg
    if #out > MAX_DEPTH then return out, nil, 'depth' end
    n = parent_of(cfg)
  end
  return out
end

local function refusal(name, cfg, old)
  local parent = parent_of(cfg)
  if old and parent_of(old) ~= parent then return {'err', 'reparent', parent_of(old) or ''} end
  if parent then
    local up, missing, deep = chain(parent)
    if parent == name then return {'err', 'cycle', name} end
    for _, c in ipairs(up) do
      if cjson.decode(c).name == name then return {'err', 'cycle', name} end
    end
    if missing then return {'err', 'missing', missing} end
    if deep or #up >= MAX_DEPTH then return {'err', 'depth', parent} end
  end
  return nil
end

if op == 'chain' then
  local out, missing = chain(ARGV[2])
  if missing and #out > 0 then return {'err', 'missing', missing} end
  return out
end

if op == 'put' then
  local last
  for i = 2, #ARGV, 3 do
    local name, cfg, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local old = get(name)
    if not (mode == 'a' and old) then
      local err = refusal(name, cfg, old)
      if err then return err end
      pending[name] = cfg
    end
    last = name
  end
  for name, cfg in pairs(pending) do redis.call('HSET', reg, name, cfg) end
  return (chain(last))
end

if op == 'remove' then
  local name = ARGV[2]
  if redis.call('HEXISTS', reg, name) == 0 then return {} end
  local flat = redis.call('HGETALL', reg)
  for i = 1, #flat, 2 do
    if parent_of(flat[i + 1]) == name then return {'err', 'children', flat[i]} end
  end
  redis.call('HDEL', reg, name)
  return {'ok'}
end
if op == 'swap' then
  local current = redis.call('HGET', reg, ARGV[2])
  if not current then return {} end
  if current ~= ARGV[3] then return {'changed'} end
  redis.call('HSET', reg, ARGV[2], ARGV[4])
  return (chain(ARGV[2]))
end
return redis.error_reply('unknown registry operation ' .. tostring(op))
