-- An operator's reset of a site's reliability record: the site starts again from the prior.
-- Run on each job shard, for its share of the record (the caller checks the site is known).
-- KEYS: the site's reliability hash, sites (the job shard's change log), clock, events
-- ARGV: site_id, events_maxlen, who (the caller's token id, for the log), now_ms ('' for Redis's clock),
--       log ('1': log the `reliability_reset` event, on one shard of them)
-- Marks the site changed, so every replica reads the cleared record with its next view. Returns 1 when there
-- was a share of the record here, 0 when there was none.
local site, now = ARGV[1], ARGV[4]
if now == '' then
  local t = redis.call('TIME')
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local had = redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), site)
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'type', 'reliability_reset', 'site', site,
    'reason', 'reset by ' .. ARGV[3], 'ts', now)
end
return had
