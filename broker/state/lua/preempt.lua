-- Preemption: stop preemptible lower-priority jobs holding a pool and hold their devices for a queued job of
-- higher priority until the victims' grace period (to checkpoint) is over; all of it or nothing.
-- The victims go back to the queue (their history says who preempted them); the devices pass to a hold
-- (hold.lua's layout, `for` the beneficiary) that the sweeper hands to the beneficiary when it expires.
-- On the job shard: the site shard's devices follow in a second step (broker.state.ledger), an outbox entry
-- that merges the victims' ledger entries into the hold's. When the hold needs more devices than the victims
-- free, the caller first reserves the rest for `hold:<id>` (reserve.lua) and this step is on its lease.
-- KEYS: prefix ('{ns}:'; every key is derived from it)
-- ARGV: beneficiary job, hold_id, site, hub, model, arch, count, price, latency_ms, offer (JSON), grace_ms,
--       max_preemptions (a victim preempted this many times is no longer preemptible), events_maxlen,
--       lease_end_ms of the devices reserved beyond the victims' ('' for none), then per victim: job, attempt
-- Returns {hold_id, expires_ms}, or a refusal: -1 the beneficiary is not queued (or is already preempting),
-- -2 site not online, -3 its tenant would hold more than its limit, -4 a victim is no longer what the caller
-- read (moved, finished, not preemptible, not of lower priority, elsewhere), 0 the devices freed (with any
-- reserved beyond them) would not be enough, -5 the beneficiary was itself preempted (no cascades), -7 the
-- lease of the devices reserved beyond the victims' is over.
local prefix = KEYS[1]
local job_id, hold_id, site, hub, model, arch = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local count, grace, max_preemptions, maxlen = tonumber(ARGV[7]), tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13]
local lease_end = ARGV[14]
local RANK = {high = 0, normal = 1, low = 2}
local job_key = prefix .. 'job:' .. job_id
local j = redis.call('HMGET', job_key, 'state', 'tenant', 'priority', 'preempting', 'preemptions')
if j[1] ~= 'queued' then return -1 end
if tonumber(j[5] or '0') > 0 then return -5 end  -- no cascades: a job that was preempted does not preempt
if j[4] and j[4] ~= '' and redis.call('HGET', prefix .. 'hold:' .. j[4], 'state') == 'held' then return -1 end
local tenant, rank = j[2], RANK[j[3]]

local victims, freed, own = {}, 0, 0
for i = 15, #ARGV, 2 do
  local v = redis.call('HMGET', prefix .. 'job:' .. ARGV[i], 'state', 'site', 'attempt', 'model', 'count',
    'preemptible', 'priority', 'tenant', 'hub', 'qscore', 'preemptions')
  if (v[1] ~= 'assigned' and v[1] ~= 'running') or v[2] ~= site or v[3] ~= ARGV[i + 1] or v[4] ~= model
      or v[6] ~= '1' or not (RANK[v[7]] > rank) then
    return -4
  end
  victims[#victims + 1] = {id = ARGV[i], v = v}
  freed = freed + tonumber(v[5])
  if v[8] == tenant then own = own + tonumber(v[5]) end
end
if lease_end == '' and freed < count then return 0 end

local limit = redis.call('HGET', prefix .. 'tenant-limits', tenant)
if limit and tonumber(redis.call('HGET', prefix .. 'tenant-usage', tenant) or '0') - own + count > tonumber(limit) then
  return -3
end

local t = redis.call('TIME')  -- one clock for every replica: the sweeper ends the hold by the same one
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if lease_end ~= '' and now > tonumber(lease_end) then return -7 end
local merge = {'merge', hub, site, 'hold:' .. hold_id, '0', tostring(count)}
local why = 'preempted by job ' .. job_id .. ' of tenant ' .. tenant
for _, victim in ipairs(victims) do
  local id, v = victim.id, victim.v
  local n, vtenant = tonumber(v[5]), v[8]
  -- release, as transition.lua does
  redis.call('HINCRBY', prefix .. 'tenant-usage', vtenant, -n)
  merge[#merge + 1] = id
  merge[#merge + 1] = v[3]
  redis.call('ZREM', prefix .. 'assigned', id)
  local fields = {'job', id, 'site', site, 'hub', v[9] or '', 'model', model, 'count', v[5], 'attempt', v[3],
    'tenant', vtenant, 'reason', why, 'ts', now}
  redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', maxlen, '*', 'type', 'released', 'state', v[1],
    unpack(fields))
  -- back to the queue, keeping its place
  local preemptions = redis.call('HINCRBY', prefix .. 'job:' .. id, 'preemptions', 1)
  redis.call('HSET', prefix .. 'job:' .. id, 'state', 'queued', 'updated', now, 'reason', why, 'last_site', site,
    'preempted_by', job_id)
  if preemptions >= max_preemptions then
    redis.call('HSET', prefix .. 'job:' .. id, 'preemptible', '0')
  end
  redis.call('HDEL', prefix .. 'job:' .. id, 'site', 'hub', 'arch', 'model', 'count', 'price', 'latency_ms',
    'assigned_at', 'accepted_at', 'started_at', 'decision', 'hold')
  local by_state = prefix .. 'tenant:' .. vtenant .. ':state:'
  local created = redis.call('HGET', prefix .. 'job:' .. id, 'created') or now
  redis.call('ZREM', by_state .. v[1], id)
  redis.call('ZADD', by_state .. 'queued', created, id)
  if redis.call('ZADD', prefix .. 'queue', v[10], id) == 1 then
    redis.call('HINCRBY', prefix .. 'queue-depth', v[7], 1)
  end
  if redis.call('ZADD', prefix .. 'tenant:' .. vtenant .. ':queue', v[10], id) == 1 then
    redis.call('ZINCRBY', prefix .. 'queued-tenants', 1, vtenant)
  end
  redis.call('RPUSH', prefix .. 'job:' .. id .. ':history', cjson.encode({ts = now, event = 'requeued',
    state = 'queued', site = site, attempt = tonumber(v[3]), reason = why, preempted_by = job_id,
    preempted_by_tenant = tenant}))
  redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', maxlen, '*', 'type', 'requeued', 'state', 'queued',
    'preempted_by', job_id, 'preempted_by_tenant', tenant, 'grace_ms', grace, unpack(fields))
end

-- the devices pass to a hold for the beneficiary until the grace period is over (hold.lua's layout)
local expires = now + grace
redis.call('HINCRBY', prefix .. 'tenant-usage', tenant, count)
-- the victims' devices pass to the hold on the site's shard next; until then the outbox holds it
redis.call('ZADD', prefix .. 'outbox', now, table.concat(merge, '\t'))
local hold_key = prefix .. 'hold:' .. hold_id
redis.call('HSET', hold_key, 'id', hold_id, 'state', 'held', 'tenant', tenant, 'site', site, 'hub', hub,
  'model', model, 'arch', arch, 'count', count, 'price', ARGV[8], 'latency_ms', ARGV[9], 'offer', ARGV[10],
  'resources', '', 'created', now, 'expires', expires, 'for', job_id)
redis.call('ZADD', prefix .. 'holds', expires, hold_id)
redis.call('ZADD', prefix .. 'tenant:' .. tenant .. ':holds', expires, hold_id)
redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', maxlen, '*', 'type', 'held', 'hold', hold_id,
  'tenant', tenant, 'site', site, 'hub', hub, 'arch', arch, 'model', model, 'count', count, 'price', ARGV[8],
  'expires', expires, 'for', job_id, 'ts', now)
local waiting = 'preempting ' .. #victims .. ' job' .. (#victims == 1 and '' or 's') .. ' at ' .. site ..
  '; starts when their grace period ends'
redis.call('HSET', job_key, 'preempting', hold_id, 'reason', waiting)
redis.call('RPUSH', job_key .. ':history', cjson.encode({ts = now, event = 'preempting', site = site,
  hold = hold_id, victims = #victims}))
return {hold_id, expires, table.concat(merge, '\t')}
