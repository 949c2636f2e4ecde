-- Read only, for the audit: a page of jobs, each job's record and where it is, read at one moment.
-- KEYS: prefix ('{ns}:'; the job, tenant-queue and parked keys are derived from it and the job's fields),
--       queue
-- ARGV: job ids (one page)
-- Returns 9 values per job: state, site, model, count, tenant ('' when absent), attempt, then 1 or 0: in the
-- queue, in its tenant's queue (the window a pass reads), in its tenant's parked set. (Whether its site's
-- ledger counts it is read on the site's shard.)
local prefix, out = KEYS[1], {}
for i = 1, #ARGV do
  local id = ARGV[i]
  local j = redis.call('HMGET', prefix .. 'job:' .. id, 'state', 'site', 'model', 'count', 'tenant', 'attempt')
  local queued = redis.call('ZSCORE', KEYS[2], id) and 1 or 0
  local window, parked = 0, 0
  if j[5] then
    window = redis.call('ZSCORE', prefix .. 'tenant:' .. j[5] .. ':queue', id) and 1 or 0
    parked = redis.call('ZSCORE', prefix .. 'tenant:' .. j[5] .. ':parked', id) and 1 or 0
  end
  for f = 1, 6 do
    out[#out + 1] = j[f] or ''
  end
  out[#out + 1] = queued
  out[#out + 1] = window
  out[#out + 1] = parked
end
return out
