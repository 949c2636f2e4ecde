-- What the broker counts at a site, read in one step with the site's assignment sequence, for a reconcile
-- message: the site stops held work that is neither listed nor newer than the stamp (a run assigned after
-- this read has a higher seq, so the list can never stop it, whenever each message arrives).
-- KEYS: site_jobs, site, prefix ('{ns}:')
-- ARGV: site_id
-- Returns {upto, job_1, attempt_1, job_2, attempt_2, ...} for the jobs assigned or running there.
local out = {tonumber(redis.call('HGET', KEYS[2], 'aseq') or '0')}
for _, job in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local j = redis.call('HMGET', KEYS[3] .. 'job:' .. job, 'state', 'site', 'attempt')
  if (j[1] == 'assigned' or j[1] == 'running') and j[2] == ARGV[1] then
    out[#out + 1] = job
    out[#out + 1] = tonumber(j[3] or '0')
  end
end
return out
