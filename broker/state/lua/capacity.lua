-- Apply a site's capacity message if its seq is newer than the last one applied.
-- KEYS: site, capacity, sites, seen, clock, status_log
-- ARGV: site_id, seq, now_ms, hub, cluster, meta_json, n, model_1, total_1, external_1, ...
-- Returns 1 when applied, 2 when applied and it brought a stale site back online, 0 when stale or
-- duplicated. Allocations (a:<model>) are never touched.
local seq = tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
if seq <= current then
  return 0
end
local changed = false
local revived = false
local status = redis.call('HGET', KEYS[1], 'status')
local new_site = not status
if not status then
  status = 'online'
  changed = true
elseif status == 'stale' then
  -- a site that missed heartbeats and speaks again is back
  status = 'online'
  changed = true
  revived = true
end
if redis.call('HGET', KEYS[1], 'meta') ~= ARGV[6] then
  redis.call('HSET', KEYS[1], 'meta', ARGV[6])
  redis.call('HINCRBY', KEYS[1], 'mv', 1)
  changed = true
end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'seen', ARGV[3], 'hub', ARGV[4], 'cluster', ARGV[5], 'status', status)
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])

local reported = {}
local n = tonumber(ARGV[7])
for i = 0, n - 1 do
  local model = ARGV[8 + i * 3]
  reported[model] = true
  local total, external = ARGV[9 + i * 3], ARGV[10 + i * 3]
  local old = redis.call('HMGET', KEYS[2], 't:' .. model, 'x:' .. model)
  if old[1] ~= total or old[2] ~= external then
    redis.call('HSET', KEYS[2], 't:' .. model, total, 'x:' .. model, external)
    changed = true
  end
end
-- a pool the site no longer reports has nothing left to offer; what is allocated there stays counted
local fields = redis.call('HKEYS', KEYS[2])
for _, field in ipairs(fields) do
  if string.sub(field, 1, 2) == 't:' and not reported[string.sub(field, 3)] then
    if redis.call('HGET', KEYS[2], field) ~= '0' then
      redis.call('HSET', KEYS[2], field, 0)
      changed = true
    end
  end
end
if changed then
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), ARGV[1])
end
if revived or new_site then
  -- a new site, or a stale one speaking again: the status log records it
  redis.call('RPUSH', KEYS[6], cjson.encode({ts = tonumber(ARGV[3]), status = status}))
  redis.call('LTRIM', KEYS[6], -100, -1)
end
if revived then
  return 2
end
return 1
