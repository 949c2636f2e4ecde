-- A new Redis primary noticed (its replication id is not the one the deployment last ran on): after a
-- failover to an asynchronous replica, or a restart, the last writes of the old primary may be gone, among
-- them assignments that sites already run. The first replica to notice records the new id and moves every
-- site's assignment sequence ahead by `ahead`, past any seq the old primary could have given out since its
-- last write reached the new one; the reconcile lists it then sends are stamped past those lost runs, so
-- sites stop them. Whoever comes second finds the id recorded and does nothing.
-- KEYS: primary (string: the replication id), sites (sorted set of sites), prefix ('{ns}:')
-- ARGV: replication_id, ahead
-- Returns the sites to reconcile ({} when the id was already recorded, or none was: a new deployment, or a
-- Redis that lost everything, where there is no sequence to move ahead of).
local recorded = redis.call('GET', KEYS[1])
if recorded == ARGV[1] then
  return {}
end
redis.call('SET', KEYS[1], ARGV[1])
if not recorded then
  return {}
end
local sites = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, site in ipairs(sites) do
  redis.call('HINCRBY', KEYS[3] .. 'site:' .. site, 'aseq', tonumber(ARGV[2]))
end
return sites
