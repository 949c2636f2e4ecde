-- Take `count` devices of `model` at a site for a queued job, atomically, or refuse.
-- KEYS: job, capacity, queue, site_jobs, assigned, events, sites, clock, site, queued_tenants, tenant_usage,
--       tenant_limits, history, prefix ('{ns}:'; the tenant's queue key is derived from the job's tenant),
--       queue_depth
-- ARGV: job_id, site_id, model, count, price, latency_ms, now_ms ('' for Redis's clock), accept_timeout_ms,
--       events_maxlen, hub, arch, decision (JSON: the scores and runners-up that decided)
-- Returns {attempt, seq} on success: the job's attempt number (>= 1) and the run's place in the site's
-- assignment sequence (what a reconcile list is stamped with); 0 when the pool has too little free (the
-- caller's view was stale); -1 when the job is no longer queued; -2 when the site is not online; -3 when
-- the job's tenant would hold more devices than its limit.
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then
  return -1
end
if redis.call('HGET', KEYS[9], 'status') ~= 'online' then
  return -2
end
local model, count = ARGV[3], tonumber(ARGV[4])
local cap = redis.call('HMGET', KEYS[2], 't:' .. model, 'x:' .. model, 'a:' .. model)
local free = tonumber(cap[1] or '0') - tonumber(cap[2] or '0') - tonumber(cap[3] or '0')
if free < count then
  return 0
end
local job = redis.call('HMGET', KEYS[1], 'tenant', 'origin', 'name', 'priority')
local tenant = job[1]
local limit = redis.call('HGET', KEYS[12], tenant)
if limit and tonumber(redis.call('HGET', KEYS[11], tenant) or '0') + count > tonumber(limit) then
  return -3
end
local now = ARGV[7]
if now == '' then
  local t = redis.call('TIME')  -- one clock for every replica: the sweeper expires by the same one
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local deadline = tonumber(now) + tonumber(ARGV[8])
redis.call('HINCRBY', KEYS[2], 'a:' .. model, count)
-- what the pool could hold when the broker last allocated there: allocated above it would be the broker's
-- fault, below it a site that shrank afterwards (audit tells them apart)
redis.call('HSET', KEYS[2], 'p:' .. model, tonumber(cap[1] or '0') - tonumber(cap[2] or '0'))
redis.call('HINCRBY', KEYS[11], tenant, count)
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local seq = redis.call('HINCRBY', KEYS[9], 'aseq', 1)
redis.call('HSET', KEYS[1], 'state', 'assigned', 'site', ARGV[2], 'hub', ARGV[10], 'model', model,
  'count', count, 'price', ARGV[5], 'latency_ms', ARGV[6], 'updated', now, 'assigned_at', now,
  'reason', '', 'arch', ARGV[11], 'decision', ARGV[12], 'aseq', seq)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[14] .. 'tenant:' .. tenant .. ':queue', ARGV[1])
redis.call('ZREM', KEYS[14] .. 'tenant:' .. tenant .. ':parked', ARGV[1])
-- the tenant's index of jobs by state (keys derived from the prefix, like its queue): queued -> assigned
local by_state = KEYS[14] .. 'tenant:' .. tenant .. ':state:'
redis.call('ZREM', by_state .. 'queued', ARGV[1])
redis.call('ZADD', by_state .. 'assigned', redis.call('HGET', KEYS[1], 'created') or now, ARGV[1])
if tonumber(redis.call('ZINCRBY', KEYS[10], -1, tenant)) <= 0 then
  redis.call('ZREM', KEYS[10], tenant)
end
redis.call('HINCRBY', KEYS[15], job[4], -1)
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], deadline, ARGV[1])
redis.call('ZADD', KEYS[7], redis.call('INCR', KEYS[8]), ARGV[2])
redis.call('RPUSH', KEYS[13], cjson.encode({ts = tonumber(now), event = 'allocated', site = ARGV[2],
  model = model, count = count, attempt = attempt}))
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[9], '*', 'type', 'allocated', 'job', ARGV[1],
  'state', 'assigned', 'site', ARGV[2], 'hub', ARGV[10], 'arch', ARGV[11], 'model', model, 'count', count,
  'price', ARGV[5], 'latency_ms', ARGV[6], 'attempt', attempt, 'tenant', tenant, 'origin', job[2],
  'name', job[3], 'seq', seq, 'ts', now)
return {attempt, seq}
