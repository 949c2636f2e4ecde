-- Move a job from one state to the next, releasing its capacity when it leaves a site.
-- KEYS: job, queue, assigned, events, sites, clock, prefix ('{ns}:'; keys that depend on the job's site
--       or tenant are derived from it), queued_tenants, tenant_usage, deadlines, history, queue_depth, usage
-- ARGV: job_id, action, site_id ('' = any), attempt ('' = any), reason, now_ms ('' for Redis's clock),
--       events_maxlen, max_attempts, reliability half-life in ms ('' = a day)
-- action: accepted | running | completed | failed | rejected | lost | requeue | expire | cancel | deadline
--   lost: the holder site says it does not hold the job (it lost it in a restart): back to the queue
--   expire: back to the queue only if still unaccepted past its deadline in the assigned set
--   deadline: fail a job still queued past the time it had to start by
-- A job that would go back to the queue after `max_attempts` attempts fails instead.
-- A job that ends while holding devices (completed, failed, cancelled) gets a usage record, priced at the
-- price fixed when it was allocated; work a lost site could not finish is not billed.
-- Returns the new state, or '' when the action does not apply (stale attempt, duplicate, final job); when the
-- job gave devices back, {new state, the outbox entry of the site shard's step that frees them}.
-- Derived from the prefix as well: the tenant's index of jobs by state (every change of state moves the job
-- between them), the `finished` set (a final state lists the job by finish time, for the archive sweep)
-- and the tenant's own usage stream (a copy of each usage record).
-- Reliability: the holder site's record `site:<id>:rel` (broker.model.reliability) counts what the site did
-- with the work, in this same step: accepted, completed, timed_out (expire), rejected, failed, lost (a `lost`
-- event, or a `requeue` of a lost site's assigned or running work) and lost_device_hours (running work
-- lost: devices x hours since it started). Every counter is decayed to `now` (halving every half-life)
-- before the event is added; `t` is the time of the last update.
local job_id, action, site, attempt, reason, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if now == '' then
  local t = redis.call('TIME')  -- one clock for every replica, the one deadlines were set by
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local prefix = KEYS[7]
local j = redis.call('HMGET', KEYS[1], 'state', 'site', 'attempt', 'model', 'count', 'hub', 'tenant', 'qscore',
  'priority', 'price', 'assigned_at', 'started_at', 'arch')
local state, holder, tenant = j[1], j[2], j[7]
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
local tenant_queue = prefix .. 'tenant:' .. (tenant or '') .. ':queue'
local tenant_parked = prefix .. 'tenant:' .. (tenant or '') .. ':parked'

local function event(kind, new_state, why)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'type', kind, 'job', job_id, 'state', new_state,
    'site', holder or '', 'hub', j[6] or '', 'model', j[4] or '', 'count', j[5] or '0',
    'attempt', j[3] or '0', 'tenant', tenant or '', 'reason', why or '', 'ts', now)
  if kind ~= 'released' then
    redis.call('RPUSH', KEYS[11], cjson.encode({ts = tonumber(now), event = kind, state = new_state,
      site = holder or cjson.null, attempt = tonumber(j[3] or '0'), reason = why ~= '' and why or cjson.null}))
  end
end

local function bill(final)
  local since = tonumber(j[12] or j[11] or now)
  local hours = math.max(tonumber(now) - since, 0) / 3600000
  local device_hours = hours * tonumber(j[5])
  local price = tonumber(j[10] or '0')
  local record = {'job', job_id, 'tenant', tenant or '', 'site', holder, 'hub', j[6] or '',
    'arch', j[13] or '', 'model', j[4], 'devices', j[5], 'start', tostring(since), 'end', now,
    'device_hours', string.format('%.6f', device_hours), 'price', j[10] or '0',
    'cost', string.format('%.4f', device_hours * price), 'state', final}
  redis.call('XADD', KEYS[13], '*', unpack(record))
  -- the same record in the tenant's own stream, which the tenant's usage reads range over
  redis.call('XADD', prefix .. 'tenant:' .. (tenant or '') .. ':usage', '*', unpack(record))
end

local released = nil  -- the site shard's step that gives the devices back (an outbox entry), when one is due
local function release()
  redis.call('HINCRBY', KEYS[9], tenant, -tonumber(j[5]))
  redis.call('ZREM', KEYS[3], job_id)
  -- the devices come back on the site's shard next (broker.state.ledger); until then the outbox holds it
  released = 'release\t' .. (j[6] or '') .. '\t' .. holder .. '\t' .. job_id .. '\t' .. j[3]
  redis.call('ZADD', prefix .. 'outbox', now, released)
  redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), holder)  -- its reliability is read again
  event('released', state, reason)
end

local RELIABILITY = {'accepted', 'completed', 'timed_out', 'rejected', 'failed', 'lost', 'lost_device_hours'}
local function rely(kind, device_hours)
  local key = prefix .. 'site:' .. holder .. ':rel'
  local r = redis.call('HMGET', key, 't', unpack(RELIABILITY))
  local t = tonumber(r[1] or now)
  local half = tonumber(ARGV[9] or '') or 86400000
  local factor = 2 ^ (-math.max(tonumber(now) - t, 0) / half)
  local out, bad = {'t', string.format('%.0f', math.max(t, tonumber(now)))}, 0
  for i, name in ipairs(RELIABILITY) do
    local v = tonumber(r[i + 1] or '0') * factor
    if name == kind then v = v + 1 end
    if name == 'lost_device_hours' then v = v + device_hours elseif i > 2 then bad = bad + v end
    out[#out + 1] = name
    out[#out + 1] = string.format('%.17g', v)
  end
  redis.call('HSET', key, unpack(out))
  return bad
end

local function unqueue()
  if redis.call('ZREM', KEYS[2], job_id) == 1 then
    redis.call('HINCRBY', KEYS[12], j[9], -1)
  end
  redis.call('ZREM', KEYS[10], job_id)
  local removed = redis.call('ZREM', tenant_queue, job_id) + redis.call('ZREM', tenant_parked, job_id)
  if removed > 0 and tonumber(redis.call('ZINCRBY', KEYS[8], -1, tenant)) <= 0 then
    redis.call('ZREM', KEYS[8], tenant)
  end
end

local function reindex(new_state)
  local by_state = prefix .. 'tenant:' .. (tenant or '') .. ':state:'
  redis.call('ZREM', by_state .. state, job_id)
  redis.call('ZADD', by_state .. new_state, redis.call('HGET', KEYS[1], 'created') or now, job_id)
end

local function finish(final, why)
  redis.call('HSET', KEYS[1], 'state', final, 'finished_at', now, 'updated', now, 'reason', why)
  reindex(final)
  redis.call('ZADD', prefix .. 'finished', now, job_id)
  event(final, final, why)
  return final
end

local function act()
  if action == 'accepted' then
    -- a QoS 1 duplicate of `accepted` finds accepted_at already set (it is cleared when the job is requeued)
    if state ~= 'assigned' or redis.call('HEXISTS', KEYS[1], 'accepted_at') == 1 then return '' end
    redis.call('ZREM', KEYS[3], job_id)
    redis.call('HSET', KEYS[1], 'accepted_at', now, 'updated', now)
    if rely('accepted', 0) > 0.001 then  -- the score moves only for a site with something bad on record
      redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), holder)
    end
    event('accepted', 'assigned', '')
    return 'assigned'
  elseif action == 'running' then
    if state ~= 'assigned' then return '' end
    redis.call('ZREM', KEYS[3], job_id)
    redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now, 'updated', now)
    reindex('running')
    event('running', 'running', '')
    return 'running'
  elseif action == 'completed' or action == 'failed' then
    if not holding then return '' end
    release()  -- marks the site changed, so every replica reads its reliability again
    rely(action, 0)
    bill(action)
    return finish(action, reason)
  elseif action == 'rejected' or action == 'requeue' or action == 'expire' or action == 'lost' then
    -- requeue (a lost site) and lost (the site says it does not hold it) apply to running work too
    if not holding or (action ~= 'requeue' and action ~= 'lost' and state ~= 'assigned') then return '' end
    if action == 'expire' then
      local due = redis.call('ZSCORE', KEYS[3], job_id)
      if not due or tonumber(due) > tonumber(now) then return '' end
    end
    release()
    if action == 'expire' then
      rely('timed_out', 0)
    elseif action == 'rejected' then
      rely('rejected', 0)
    else  -- work the site lost: running work counts its devices x hours since it started
      local started = tonumber(j[12] or '')
      rely('lost', (state == 'running' and started) and math.max(tonumber(now) - started, 0) / 3600000 * tonumber(j[5]) or 0)
    end
    if tonumber(j[3] or '0') >= tonumber(ARGV[8]) then
      return finish('failed', 'gave up after ' .. j[3] .. ' attempts; last: ' .. reason)
    end
    redis.call('HSET', KEYS[1], 'state', 'queued', 'updated', now, 'reason', reason, 'last_site', holder)
    reindex('queued')
    redis.call('HDEL', KEYS[1], 'site', 'hub', 'arch', 'model', 'count', 'price', 'latency_ms', 'assigned_at',
      'accepted_at', 'started_at', 'decision', 'hold')
    if redis.call('ZADD', KEYS[2], j[8], job_id) == 1 then
      redis.call('HINCRBY', KEYS[12], j[9], 1)
    end
    if redis.call('ZADD', tenant_queue, j[8], job_id) == 1 then
      redis.call('ZINCRBY', KEYS[8], 1, tenant)
    end
    event('requeued', 'queued', reason)
    return 'queued'
  elseif action == 'cancel' then
    if state ~= 'queued' and not holding then return '' end
    if holding then
      release()
      bill('cancelled')
    end
    unqueue()
    return finish('cancelled', reason)
  elseif action == 'deadline' then
    redis.call('ZREM', KEYS[10], job_id)
    if state ~= 'queued' then return '' end
    unqueue()
    return finish('failed', reason)
  end
  return redis.error_reply('unknown action ' .. action)
end

local result = act()
if released and type(result) == 'string' and result ~= '' then
  return {result, released}
end
return result
