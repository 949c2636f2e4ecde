-- Move finished jobs older than the retention out of the hot set, at most `batch` of them: each job's hash
-- and history list become one archived record, and the job leaves its tenant's job and state indexes.
-- KEYS: finished, prefix ('{ns}:'; every job's keys are derived from it and the job's id and tenant)
-- ARGV: finished before (ms), batch, archive ttl ms ('0' keeps the record), now_ms
-- The record is JSON {"job": {field: value}, "history": [transition, ...], "archived": ms}; the history
-- entries are copied as stored, byte for byte.
-- Returns the number of jobs archived.
local prefix = KEYS[2]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local final = {completed = true, failed = true, cancelled = true}
local archived = 0
for _, id in ipairs(ids) do
  local job_key, history_key = prefix .. 'job:' .. id, prefix .. 'job:' .. id .. ':history'
  local flat = redis.call('HGETALL', job_key)
  local job = {}
  for i = 1, #flat, 2 do
    job[flat[i]] = flat[i + 1]
  end
  if job.state and final[job.state] then
    local history = redis.call('LRANGE', history_key, 0, -1)
    local record = '{"job":' .. cjson.encode(job) .. ',"history":[' .. table.concat(history, ',') ..
      '],"archived":' .. ARGV[4] .. '}'
    local archive_key = prefix .. 'archive:' .. id
    if tonumber(ARGV[3]) > 0 then
      redis.call('SET', archive_key, record, 'PX', ARGV[3])
    else
      redis.call('SET', archive_key, record)
    end
    redis.call('DEL', job_key, history_key)
    local tenant = job.tenant or ''
    redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':jobs', id)
    redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':state:' .. job.state, id)
    redis.call('ZREM', prefix .. 'deadlines', id)
    archived = archived + 1
  end
  -- a job gone or no longer final (it cannot leave a final state) has nothing to archive either
  redis.call('ZREM', KEYS[1], id)
end
return archived
