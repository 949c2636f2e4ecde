-- What the broker counts at a site, read in one step with the site's assignment sequence, for a reconcile
-- message: the site stops held work that is neither listed nor newer than the stamp (a run assigned after
-- this read has a higher seq, so the list can never stop it, whenever each message arrives).
-- Read from the site's ledger on its hub's shard: every job with devices there (an entry whose binding on
-- the job shard is still on its lease is listed too; the site holds nothing it was not sent).
-- KEYS: held (the site's ledger), site
-- Returns {upto, job_1, attempt_1, job_2, attempt_2, ...}.
local out = {tonumber(redis.call('HGET', KEYS[2], 'aseq') or '0')}
local rows = redis.call('HGETALL', KEYS[1])
for i = 1, #rows, 2 do
  if string.sub(rows[i], 1, 5) ~= 'hold:' then
    out[#out + 1] = rows[i]
    out[#out + 1] = tonumber(string.match(rows[i + 1], '^(%S+)'))
  end
end
return out
