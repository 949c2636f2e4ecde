-- Store a new job and queue it, unless the caller is over its submission rate, its tenant has the most
-- queued jobs allowed, or its Idempotency-Key already created one.
-- KEYS: job, queue, tenant_queue, queued_tenants, tenant_jobs, events, deadlines, idempotency, history,
--       queue_depth, submit_bucket, tenant_state_queued (the tenant's index of queued jobs), hold (the hold's
--       key, or any key when there is none)
-- ARGV: job_id, qscore (with created_ms '': the priority's handicap), created_ms ('' for Redis's clock),
--       tenant, deadline_ms ('' for none), idempotency ttl s ('' for no key), body hash, events_maxlen,
--       rate per s ('' for no limit), burst, max queued per tenant ('' for none), hold_id ('' for none), the
--       hash of what the job asks for where it may run (its placement hash), then field, value pairs for the
--       job hash
-- A job submitted with a hold is stored only while the hold stands, is its tenant's and was quoted for what
-- the job asks (allocate.lua, run with it in one transaction, then hands it the hold's devices).
-- Returns {job_id, 1, created_ms, qscore} when created, {existing_job_id, 0} when the key was seen with
-- the same body, {existing_job_id, -1} when the key was used with a different body, {retry_after_ms, -2} when the
-- rate limit refuses, {queued_jobs, -3} when the tenant's queue is full, {why, -4} when the hold is not
-- standing (why: unknown, expired, used or released) and {'different', -5} when it was quoted for another job.
local job_id, qscore, created, tenant = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[6] ~= '' then
  local seen = redis.call('GET', KEYS[8])
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    local existing, hash = string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)
    return {existing, hash == ARGV[7] and 0 or -1}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- this very submission ran already (its reply was lost and it was sent again): the job, once
  return {job_id, 0}
end
local t = redis.call('TIME')  -- one clock for every replica: the bucket and the queue order
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[12] ~= '' then
  local h = redis.call('HMGET', KEYS[13], 'state', 'tenant', 'expires', 'resources')
  if not h[1] or h[2] ~= tenant then
    return {'unknown', -4}
  end
  if h[1] == 'held' and tonumber(h[3]) <= now then
    return {'expired', -4}
  end
  if h[1] ~= 'held' then
    return {h[1], -4}
  end
  if h[4] ~= ARGV[13] then
    return {'different', -5}
  end
end
if created == '' then
  -- submitted now, by Redis's clock: the queue score is that time plus the priority's handicap (ARGV[2])
  created = tostring(now)
  qscore = tostring(now + tonumber(qscore))
end
if ARGV[9] ~= '' then
  -- token bucket: `burst` submissions at once, refilled at `rate` per second (a retry with a known
  -- Idempotency-Key returned above and cost nothing)
  local rate, burst = tonumber(ARGV[9]), tonumber(ARGV[10])
  local bucket = redis.call('HMGET', KEYS[11], 'tokens', 'ts')
  local tokens, ts = tonumber(bucket[1]) or burst, tonumber(bucket[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < 1 then
    return {tostring(math.ceil((1 - tokens) * 1000 / rate)), -2}
  end
  redis.call('HSET', KEYS[11], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[11], math.ceil(burst * 1000 / rate) + 1000)
end
if ARGV[11] ~= '' then
  local queued = tonumber(redis.call('ZSCORE', KEYS[4], tenant) or '0')
  if queued >= tonumber(ARGV[11]) then
    return {tostring(queued), -3}
  end
end
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[8], job_id .. ' ' .. ARGV[7], 'EX', ARGV[6])
end
local fields = {}
for i = 14, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[1], 'created', created, 'updated', created, 'qscore', qscore)
redis.call('ZADD', KEYS[2], qscore, job_id)
redis.call('ZADD', KEYS[3], qscore, job_id)
redis.call('ZINCRBY', KEYS[4], 1, tenant)
redis.call('HINCRBY', KEYS[10], redis.call('HGET', KEYS[1], 'priority'), 1)
redis.call('ZADD', KEYS[5], created, job_id)
redis.call('ZADD', KEYS[12], created, job_id)
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[7], ARGV[5], job_id)
end
redis.call('RPUSH', KEYS[9], cjson.encode({ts = tonumber(created), event = 'queued'}))
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'type', 'queued', 'job', job_id, 'state', 'queued',
  'tenant', tenant, 'origin', redis.call('HGET', KEYS[1], 'origin'), 'name', redis.call('HGET', KEYS[1], 'name'),
  'ts', created)
return {job_id, 1, created, qscore}
