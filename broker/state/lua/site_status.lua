-- Set a site's status (online, offline, stale) and record the change for the matcher.
-- KEYS (the site's hub's shard): site, sites, clock, status_log, wake (bumped when a site comes online: parked jobs are looked at again)
-- ARGV: site_id, status, expect ('' for any; otherwise only change when the current status equals it), now_ms
--       ('' for Redis's clock)
-- Each change is appended to the site's status log (the last 100 kept), for operators.
-- Returns 1 when the status changed, 0 otherwise (also for `online` on a stale site).
local current = redis.call('HGET', KEYS[1], 'status')
if ARGV[3] ~= '' and current ~= ARGV[3] then
  return 0
end
if current == ARGV[2] then
  return 0
end
if ARGV[2] == 'online' and current == 'stale' then
  -- a retained `online`, replayed to a (re)connecting replica, is no sign of life: only a fresh capacity
  -- message brings a silent site back
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[2] == 'online' then
  redis.call('INCR', KEYS[5])
end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
local now = ARGV[4]
if now == '' then
  local t = redis.call('TIME')
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
redis.call('RPUSH', KEYS[4], cjson.encode({ts = tonumber(now), status = ARGV[2]}))
redis.call('LTRIM', KEYS[4], -100, -1)
return 1
