-- Move a job from one state to the next, releasing its capacity when it leaves a site.
-- KEYS: job, queue, assigned, events, sites, clock, prefix ('{ns}:'; capacity and site_jobs keys are
--       derived from it because the job's site is known only inside the script)
-- ARGV: job_id, action, site_id ('' = any), attempt ('' = any), reason, now_ms, events_maxlen
-- action: accepted | running | completed | failed | rejected | requeue | expire | cancel
-- (expire: back to the queue only if still unaccepted past its deadline in the assigned set)
-- Returns the new state, or '' when the action does not apply (stale attempt, duplicate, final job).
local job_id, action, site, attempt, reason, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local j = redis.call('HMGET', KEYS[1], 'state', 'site', 'attempt', 'model', 'count', 'hub', 'tenant', 'qscore')
local state, holder = j[1], j[2]
if not state then
  return ''
end
if site ~= '' and holder ~= site then
  return ''
end
if attempt ~= '' and j[3] ~= attempt then
  return ''
end
local holding = state == 'assigned' or state == 'running'

local function event(kind, new_state, extra_reason)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'type', kind, 'job', job_id, 'state', new_state,
    'site', holder or '', 'hub', j[6] or '', 'model', j[4] or '', 'count', j[5] or '0',
    'attempt', j[3] or '0', 'tenant', j[7] or '', 'reason', extra_reason or '', 'ts', now)
end

local function release()
  local prefix = KEYS[7]
  redis.call('HINCRBY', prefix .. 'cap:' .. holder, 'a:' .. j[4], -tonumber(j[5]))
  redis.call('SREM', prefix .. 'site:' .. holder .. ':jobs', job_id)
  redis.call('ZREM', KEYS[3], job_id)
  redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), holder)
  event('released', state, reason)
end

if action == 'accepted' then
  if state ~= 'assigned' then return '' end
  redis.call('ZREM', KEYS[3], job_id)
  redis.call('HSET', KEYS[1], 'accepted_at', now, 'updated', now)
  event('accepted', 'assigned')
  return 'assigned'
elseif action == 'running' then
  if state ~= 'assigned' then return '' end
  redis.call('ZREM', KEYS[3], job_id)
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now, 'updated', now)
  event('running', 'running')
  return 'running'
elseif action == 'completed' or action == 'failed' then
  if not holding then return '' end
  release()
  redis.call('HSET', KEYS[1], 'state', action, 'finished_at', now, 'updated', now, 'reason', reason)
  event(action, action, reason)
  return action
elseif action == 'rejected' or action == 'requeue' or action == 'expire' then
  if not holding or (action ~= 'requeue' and state ~= 'assigned') then return '' end
  if action == 'expire' then
    local deadline = redis.call('ZSCORE', KEYS[3], job_id)
    if not deadline or tonumber(deadline) > tonumber(now) then return '' end
  end
  release()
  redis.call('HSET', KEYS[1], 'state', 'queued', 'updated', now, 'reason', reason, 'last_site', holder)
  redis.call('HDEL', KEYS[1], 'site', 'hub', 'arch', 'model', 'count', 'price', 'latency_ms', 'assigned_at',
    'accepted_at', 'started_at', 'decision')
  redis.call('ZADD', KEYS[2], j[8], job_id)
  event('requeued', 'queued', reason)
  return 'queued'
elseif action == 'cancel' then
  if state ~= 'queued' and not holding then return '' end
  if holding then release() end
  redis.call('ZREM', KEYS[2], job_id)
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', now, 'updated', now, 'reason', reason)
  event('cancelled', 'cancelled', reason)
  return 'cancelled'
end
return redis.error_reply('unknown action ' .. action)
