-- Step two of a two-step allocation (broker.state.ledger): bind a queued job to the devices reserve.lua took
-- for its next attempt at a site, on the job shard; or, with a hold, give the job the hold's devices (the
-- site shard's entry passes from the hold to the job afterwards, an outbox step).
-- KEYS: job, queue, assigned, events, queued_tenants, tenant_usage, tenant_limits, history, prefix ('{ns}:';
--       the tenant's keys are derived from the job's tenant), queue_depth, hold (the hold's key, or any key
--       when there is none), outbox
-- ARGV: job_id, site_id, model, count, price, latency_ms, now_ms ('' for Redis's clock), accept_timeout_ms,
--       events_maxlen, hub, arch, decision (JSON: the scores and runners-up that decided), hold_id ('' for
--       none), attempt (the one reserved: the job's attempt must be the one before it; '' with a hold),
--       seq (the run's place in the site's assignment sequence; '' with a hold), lease_end_ms ('' with a hold),
--       choice (which of the decision's pools reserve.lua took: 0 the chosen one, i the i-th runner-up)
-- With a hold (hold.lua), the job takes the hold's devices at the hold's price, and only if the hold is
-- still standing, is its tenant's, is for this job (when it names one) and is for this site, model and
-- count; its devices are already counted in the pool and the tenant's usage.
-- Returns the job's attempt number (>= 1) on success; else -1 when the job is no longer queued or not at the
-- attempt reserved for; -3 when the job's tenant would hold more devices than its limit; -4 when the hold
-- is not standing or not for this placement; -7 when the lease is over (the sweeper gives the devices back).
local now = ARGV[7]
if now == '' then
  local t = redis.call('TIME')  -- one clock for every replica: the sweeper expires by the same one
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local hold_id = ARGV[13]
if hold_id == '' and tonumber(now) > tonumber(ARGV[16]) then
  return -7
end
local j = redis.call('HMGET', KEYS[1], 'state', 'tenant', 'origin', 'name', 'priority', 'attempt')
if j[1] ~= 'queued' or (hold_id == '' and tonumber(j[6] or '0') + 1 ~= tonumber(ARGV[14])) then
  return -1
end
local tenant = j[2]
local limit = redis.call('HGET', KEYS[7], tenant)
local held = limit and tonumber(redis.call('HGET', KEYS[6], tenant) or '0')
if hold_id ~= '' then
  local h = redis.call('HMGET', KEYS[11], 'state', 'tenant', 'site', 'model', 'count', 'for', 'price')
  if h[1] ~= 'held' or h[2] ~= tenant or h[3] ~= ARGV[2] or h[4] ~= ARGV[3] or tonumber(h[5]) ~= tonumber(ARGV[4])
      or (h[6] and h[6] ~= '' and h[6] ~= ARGV[1]) then
    return -4
  end
  ARGV[5] = h[7]  -- the price the hold was quoted at
  limit = nil  -- the hold's devices are in the tenant's usage already
end
local site, model, count, price, latency, hub, arch = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6],
  ARGV[10], ARGV[11]
if limit and held + count > tonumber(limit) then
  return -3
end
local choice = tonumber(ARGV[17] or '0') + 1
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
local deadline = tonumber(now) + tonumber(ARGV[8])
local prefix = KEYS[9]
if hold_id == '' then
  redis.call('HINCRBY', KEYS[6], tenant, count)
else
  -- the hold's devices pass to the job: the tenant's usage stays as it is, and the site shard's entry passes
  -- from the hold to the job next (the outbox holds the step until it is done)
  redis.call('HSET', KEYS[11], 'state', 'used', 'job', ARGV[1], 'ended', now)
  redis.call('PEXPIRE', KEYS[11], 86400000)
  redis.call('ZREM', prefix .. 'holds', hold_id)
  redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':holds', hold_id)
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local seq = ARGV[15]
if hold_id ~= '' then
  redis.call('ZADD', KEYS[12], now, 'merge\t' .. hub .. '\t' .. site .. '\t' .. ARGV[1] .. '\t' .. attempt .. '\t' ..
    count .. '\thold:' .. hold_id .. '\t0')
end
redis.call('HSET', KEYS[1], 'state', 'assigned', 'site', site, 'hub', hub, 'model', model,
  'count', count, 'price', price, 'latency_ms', latency, 'updated', now, 'assigned_at', now,
  'reason', '', 'arch', arch, 'decision', decision, 'aseq', seq, 'hold', hold_id)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':queue', ARGV[1])
redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':parked', ARGV[1])
-- the tenant's index of jobs by state (keys derived from the prefix, like its queue): queued -> assigned
local by_state = prefix .. 'tenant:' .. tenant .. ':state:'
redis.call('ZREM', by_state .. 'queued', ARGV[1])
redis.call('ZADD', by_state .. 'assigned', redis.call('HGET', KEYS[1], 'created') or now, ARGV[1])
if tonumber(redis.call('ZINCRBY', KEYS[5], -1, tenant)) <= 0 then
  redis.call('ZREM', KEYS[5], tenant)
end
redis.call('HINCRBY', KEYS[10], j[5], -1)
redis.call('ZADD', KEYS[3], deadline, ARGV[1])
redis.call('RPUSH', KEYS[8], cjson.encode({ts = tonumber(now), event = 'allocated', site = site,
  model = model, count = count, attempt = attempt, hold = hold_id ~= '' and hold_id or nil}))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'type', 'allocated', 'job', ARGV[1],
  'state', 'assigned', 'site', site, 'hub', hub, 'arch', arch, 'model', model, 'count', count,
  'price', price, 'latency_ms', latency, 'attempt', attempt, 'tenant', tenant, 'origin', j[3],
  'name', j[4], 'seq', seq, 'hold', hold_id, 'ts', now)
return attempt
