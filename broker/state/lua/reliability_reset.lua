-- An operator's reset of a site's reliability record: the site starts again from the prior.
-- KEYS: the site's reliability hash, sites (the job shard's change log), clock, events, places
-- ARGV: site_id, events_maxlen, who (the caller's token id, for the log), now_ms ('' for Redis's clock)
-- Marks the site changed, so every replica reads the cleared record with its next view; logs a
-- `reliability_reset` event. Returns 1 when there was a record, 0 when there was none, -1 for an unknown site.
local site, now = ARGV[1], ARGV[4]
if redis.call('HEXISTS', KEYS[5], site) == 0 then
  return -1
end
if now == '' then
  local t = redis.call('TIME')
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local had = redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), site)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'type', 'reliability_reset', 'site', site,
  'reason', 'reset by ' .. ARGV[3], 'ts', now)
return had
