-- Record why queued jobs still wait, and park the unplaceable ones; only jobs still queued are touched (a
-- job another replica placed meanwhile keeps its record).
-- A parked job leaves its tenant's window (the head a pass reads) for the tenant's parked set, scored by
-- the `wake` generation, until capacity may have grown (`wake` passes it): many unplaceable jobs can then
-- never hide a tenant's later, placeable ones.
-- KEYS: prefix ('{ns}:')
-- ARGV: the `wake` generation read before the view that found the jobs unplaceable (a bump since then
--       wakes them at once: no wake-up is lost), then (job, reason ('' keeps it), park '1' | '0') triples
-- Returns how many jobs were still queued.
local gen = ARGV[1]
local touched = 0
for i = 2, #ARGV, 3 do
  local job, reason, park = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = KEYS[1] .. 'job:' .. job
  local j = redis.call('HMGET', key, 'state', 'tenant')
  if j[1] == 'queued' then
    touched = touched + 1
    if reason ~= '' then
      redis.call('HSET', key, 'reason', reason)
    end
    if park == '1' then
      local window = KEYS[1] .. 'tenant:' .. j[2] .. ':queue'
      local parked = KEYS[1] .. 'tenant:' .. j[2] .. ':parked'
      if redis.call('ZREM', window, job) == 1 or redis.call('ZSCORE', parked, job) then
        redis.call('ZADD', parked, gen, job)
      end
    end
  end
end
return touched
