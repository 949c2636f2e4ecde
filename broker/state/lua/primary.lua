-- A new Redis primary noticed for one shard (its replication id is not the one the shard last ran on):
-- after a failover to an asynchronous replica, or a restart, the last writes of the old primary may be
-- gone. The first replica to notice records the new id; on a hub's shard it also moves every site's
-- assignment sequence ahead by `ahead`, past any seq the old primary could have given out since its last
-- write reached the new one (the reconcile lists it then sends are stamped past those lost runs, so sites
-- stop them), and puts every ledger entry on the pending set, due now (unless on its lease already): the
-- sweeper checks each against the job shard. Whoever comes second finds the id recorded and does nothing.
-- KEYS: primary (string: the replication id), sites (the shard's change log)
-- ARGV: replication_id, ahead, prefix ('{ns.hub}:', or '' on the job shard)
-- Returns the sites to reconcile ({} when the id was already recorded, or none was: a new deployment, or a
-- Redis that lost everything, where there is no sequence to move ahead of), or 1 on the job shard when it
-- was a new primary there.
local recorded = redis.call('GET', KEYS[1])
if recorded == ARGV[1] then
  return {}
end
redis.call('SET', KEYS[1], ARGV[1])
if not recorded then
  return {}
end
if (ARGV[3] or '') == '' then
  return 1
end
local prefix = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sites = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, site in ipairs(sites) do
  redis.call('HINCRBY', prefix .. 'site:' .. site, 'aseq', tonumber(ARGV[2]))
  local rows = redis.call('HGETALL', prefix .. 'site:' .. site .. ':held')
  for i = 1, #rows, 2 do
    redis.call('ZADD', prefix .. 'pending', 'NX', now, site .. '\t' .. rows[i] .. '\t' .. string.match(rows[i + 1], '^(%S+)'))
  end
end
return sites
