-- Apply a site's capacity message: every message is a heartbeat; its content is applied only when it is
-- newer than the last one applied (seq orders content within one boot of the adapter; a new boot id
-- starts the order again). A site's place is not its own to say: the caller checked the message against the
-- site's place (broker.state.sites: the registry's hub and cluster, else the hub it first reported) and runs
-- this on that hub's shard, with the cluster the site is in.
-- KEYS: site, capacity, sites (the hub's), seen, clock, status_log, wake (bumped when the site's offer
--       changed or it came back: jobs parked as unplaceable are looked at again)
-- ARGV: site_id, seq, now_ms ('' for Redis's clock), hub, cluster, meta_json, n, model_1, total_1, external_1, ..., then boot
--       (after the pools; '' when the adapter sends none)
-- Returns 1 when applied, 2 when it brought a stale site back online (applied or not), 0 when the content
-- was stale or a duplicate.
local n = tonumber(ARGV[7])
local now = ARGV[3]
if now == '' then
  local t = redis.call('TIME')  -- the heartbeat's time by Redis's clock, the one the sweeper compares with
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local boot = ARGV[8 + n * 3] or ''
local hub, cluster = ARGV[4], ARGV[5]
local status = redis.call('HGET', KEYS[1], 'status')
local last = redis.call('HMGET', KEYS[1], 'seq', 'boot')
local current = tonumber(last[1] or '-1')
local same_boot = (last[2] or '') == boot
if not same_boot then
  current = -1  -- the adapter restarted: its counter starts again
end
local duplicate = same_boot and tonumber(ARGV[2]) == current
-- a replayed retained message, or a QoS 1 redelivery, repeats the last one exactly: it is not a sign of life
if not duplicate and status then
  redis.call('HSET', KEYS[1], 'seen', now)
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
local revived = status == 'stale' and not duplicate
if tonumber(ARGV[2]) <= current then
  if revived then
    redis.call('HSET', KEYS[1], 'status', 'online')
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), ARGV[1])
    redis.call('INCR', KEYS[7])
    redis.call('RPUSH', KEYS[6], cjson.encode({ts = tonumber(now), status = 'online'}))
    redis.call('LTRIM', KEYS[6], -100, -1)
    return 2
  end
  return 0
end
local changed = false
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
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'boot', boot, 'seen', now, 'hub', hub, 'cluster', cluster,
  'status', status)
redis.call('ZADD', KEYS[4], now, ARGV[1])

local reported = {}
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
  redis.call('INCR', KEYS[7])
end
if revived or new_site then
  -- a new site, or a stale one speaking again: the status log records it
  redis.call('RPUSH', KEYS[6], cjson.encode({ts = tonumber(now), status = status}))
  redis.call('LTRIM', KEYS[6], -100, -1)
end
if revived then
  return 2
end
return 1
