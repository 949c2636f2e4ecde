-- Take `count` devices of `model` at a site for a queued job, atomically, or refuse; the decision's
-- runners-up may follow, each tried in order when the pools before it cannot take the job now.
-- KEYS: job, capacity, queue, site_jobs, assigned, events, sites, clock, site, queued_tenants, tenant_usage,
--       tenant_limits, history, prefix ('{ns}:'; the tenant's queue key is derived from the job's tenant),
--       queue_depth, hold (the hold's key, or any key when there is none), then per runner-up: its capacity,
--       site_jobs and site keys
-- ARGV: job_id, site_id, model, count, price, latency_ms, now_ms ('' for Redis's clock), accept_timeout_ms,
--       events_maxlen, hub, arch, decision (JSON: the scores and runners-up that decided), hold_id ('' for
--       none), then per runner-up: site_id, hub, model, count, price, latency_ms, arch
-- With a hold (hold.lua), the job takes the hold's devices at the hold's price, and only if the hold is
-- still standing, is its tenant's, is for this job (when it names one) and is for this site, model and
-- count; its devices are already counted in the pool and the tenant's usage. A hold takes no runners-up.
-- Returns {attempt, seq, choice} on success: the job's attempt number (>= 1), the run's place in the site's
-- assignment sequence (what a reconcile list is stamped with) and which pool took it (0: the chosen one,
-- i: the i-th runner-up); else the first pool's refusal: 0 when it has too little free (the caller's view
-- was stale); -1 when the job is no longer queued; -2 when the site is not online; -3 when the job's tenant
-- would hold more devices than its limit; -4 when the hold is not standing or not for this placement.
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then
  return -1
end
local job = redis.call('HMGET', KEYS[1], 'tenant', 'origin', 'name', 'priority')
local tenant = job[1]
local limit = redis.call('HGET', KEYS[12], tenant)
local held = limit and tonumber(redis.call('HGET', KEYS[11], tenant) or '0')
local hold_id = ARGV[13]
if hold_id ~= '' then
  local h = redis.call('HMGET', KEYS[16], 'state', 'tenant', 'site', 'model', 'count', 'for', 'price')
  if h[1] ~= 'held' or h[2] ~= tenant or h[3] ~= ARGV[2] or h[4] ~= ARGV[3] or tonumber(h[5]) ~= tonumber(ARGV[4])
      or (h[6] and h[6] ~= '' and h[6] ~= ARGV[1]) then
    return -4
  end
  ARGV[5] = h[7]  -- the price the hold was quoted at
  limit = nil  -- the hold's devices are in the tenant's usage already
end
local pools = {{KEYS[2], KEYS[4], KEYS[9], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[10], ARGV[11]}}
for i = 0, (hold_id == '' and (#KEYS - 16) / 3 or 0) - 1 do
  local k, a = 17 + 3 * i, 14 + 7 * i
  pools[#pools + 1] = {KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5], ARGV[a + 1], ARGV[a + 6]}
end
local refusal, choice, cap
for i, pool in ipairs(pools) do
  local code
  if redis.call('HGET', pool[3], 'status') ~= 'online' then
    code = -2
  else
    cap = redis.call('HMGET', pool[1], 't:' .. pool[5], 'x:' .. pool[5], 'a:' .. pool[5])
    local free = tonumber(cap[1] or '0') - tonumber(cap[2] or '0') - tonumber(cap[3] or '0')
    if hold_id == '' and free < tonumber(pool[6]) then
      code = 0
    elseif limit and held + tonumber(pool[6]) > tonumber(limit) then
      code = -3
    end
  end
  if code == nil then
    choice = i
    break
  end
  refusal = refusal or code
end
if choice == nil then
  return refusal
end
local pool = pools[choice]
KEYS[2], KEYS[4], KEYS[9] = pool[1], pool[2], pool[3]
local site, model, count, price, latency, hub, arch = pool[4], pool[5], tonumber(pool[6]), pool[7], pool[8],
  pool[9], pool[10]
local decision = ARGV[12]
if choice > 1 then
  -- the record of why says what took the job: that runner-up first, the others after it
  -- (the record shows as many runners-up as it did; any further ones it carries stay under "more")
  local d = cjson.decode(decision)
  local options = {d.chosen}
  for _, r in ipairs(d.runners_up) do options[#options + 1] = r end
  for _, r in ipairs(d.more or {}) do options[#options + 1] = r end
  if options[choice] ~= nil then
    local shown, more = {}, {}
    for i, o in ipairs(options) do
      if i ~= choice then
        if #shown < #d.runners_up then shown[#shown + 1] = o else more[#more + 1] = o end
      end
    end
    local record = {chosen = options[choice], runners_up = shown}
    if #more > 0 then record.more = more end
    decision = cjson.encode(record)
  end
end
local now = ARGV[7]
if now == '' then
  local t = redis.call('TIME')  -- one clock for every replica: the sweeper expires by the same one
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local deadline = tonumber(now) + tonumber(ARGV[8])
if hold_id == '' then
  redis.call('HINCRBY', KEYS[2], 'a:' .. model, count)
  -- what the pool could hold when the broker last allocated there: allocated above it would be the broker's
  -- fault, below it a site that shrank afterwards (audit tells them apart)
  redis.call('HSET', KEYS[2], 'p:' .. model, tonumber(cap[1] or '0') - tonumber(cap[2] or '0'))
  redis.call('HINCRBY', KEYS[11], tenant, count)
else
  -- the hold's devices pass to the job: the pool's counter and the tenant's usage stay as they are
  redis.call('HSET', KEYS[16], 'state', 'used', 'job', ARGV[1], 'ended', now)
  redis.call('PEXPIRE', KEYS[16], 86400000)
  redis.call('ZREM', KEYS[14] .. 'holds', hold_id)
  redis.call('ZREM', KEYS[14] .. 'tenant:' .. tenant .. ':holds', hold_id)
  redis.call('SREM', KEYS[14] .. 'site:' .. site .. ':holds', hold_id)
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local seq = redis.call('HINCRBY', KEYS[9], 'aseq', 1)
redis.call('HSET', KEYS[1], 'state', 'assigned', 'site', site, 'hub', hub, 'model', model,
  'count', count, 'price', price, 'latency_ms', latency, 'updated', now, 'assigned_at', now,
  'reason', '', 'arch', arch, 'decision', decision, 'aseq', seq, 'hold', hold_id)
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
redis.call('ZADD', KEYS[7], redis.call('INCR', KEYS[8]), site)
redis.call('RPUSH', KEYS[13], cjson.encode({ts = tonumber(now), event = 'allocated', site = site,
  model = model, count = count, attempt = attempt, hold = hold_id ~= '' and hold_id or nil}))
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[9], '*', 'type', 'allocated', 'job', ARGV[1],
  'state', 'assigned', 'site', site, 'hub', hub, 'arch', arch, 'model', model, 'count', count,
  'price', price, 'latency_ms', latency, 'attempt', attempt, 'tenant', tenant, 'origin', job[2],
  'name', job[3], 'seq', seq, 'hold', hold_id, 'ts', now)
return {attempt, seq, choice - 1}
