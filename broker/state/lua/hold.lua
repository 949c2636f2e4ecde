-- Holds: a quote's devices reserved at the quoted price for a short time, taken and given back on the job
-- shard (the devices themselves are the site shard's ledger entry `hold:<id>`, broker.state.ledger).
-- A standing hold's devices are in its site's `a:<model>` counter and in its tenant's usage, like a job's,
-- so nothing else can take them and they count against the tenant's limit; bind.lua hands them to the
-- job submitted with the hold (state used), or they come back here (expired, released).
-- KEYS: hold, prefix ('{ns}:'; every other key is derived from it, the tenant's from the hold's own fields)
-- ARGV: action, hold_id, then
--   take:    tenant, ttl_ms, max standing holds of the tenant ('' none), resources hash, events_maxlen,
--            for_job ('' none: the job a preemption holds the devices for), now_ms ('' for Redis's clock),
--            lease_end_ms (of the devices reserve.lua took for `hold:<id>`), then the option they were taken
--            at: site, hub, model, arch, count, price, latency_ms, offer (JSON)
--   release: tenant ('' any), reason, events_maxlen, now_ms ('')
--   expire:  reason, events_maxlen, now_ms ('') -- only once the hold's time is up
-- take returns expires_ms, or a refusal: -3 the tenant would hold more than its limit, -5 the tenant already
-- has the most standing holds allowed; -6 the hold id exists; -7 the lease is over.
-- release and expire return the outbox entry of the site shard's step that gives the devices back when the
-- hold ended here, 0 when it was not standing (used, ended, another tenant's, or not due).
local action, hold_id, prefix = ARGV[1], ARGV[2], KEYS[2]

local function clock(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')  -- one clock for every replica: expiry is judged by the same one
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

if action == 'take' then
  local tenant, ttl, max_holds, resources, maxlen, for_job = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6],
    ARGV[7], ARGV[8]
  local now = clock(ARGV[9])
  if now > tonumber(ARGV[10]) then
    return -7
  end
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return -6
  end
  local tenant_holds = prefix .. 'tenant:' .. tenant .. ':holds'
  if max_holds ~= '' and redis.call('ZCARD', tenant_holds) >= tonumber(max_holds) then
    return -5
  end
  local site, hub, model, arch, count = ARGV[11], ARGV[12], ARGV[13], ARGV[14], tonumber(ARGV[15])
  local limit = redis.call('HGET', prefix .. 'tenant-limits', tenant)
  if limit and tonumber(redis.call('HGET', prefix .. 'tenant-usage', tenant) or '0') + count > tonumber(limit) then
    return -3
  end
  local expires = now + ttl
  redis.call('HINCRBY', prefix .. 'tenant-usage', tenant, count)
  redis.call('HSET', KEYS[1], 'id', hold_id, 'state', 'held', 'tenant', tenant, 'site', site, 'hub', hub,
    'model', model, 'arch', arch, 'count', count, 'price', ARGV[16], 'latency_ms', ARGV[17],
    'offer', ARGV[18], 'resources', resources, 'created', now, 'expires', expires, 'for', for_job)
  redis.call('ZADD', prefix .. 'holds', expires, hold_id)
  redis.call('ZADD', tenant_holds, expires, hold_id)
  redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', maxlen, '*', 'type', 'held', 'hold', hold_id,
    'tenant', tenant, 'site', site, 'hub', hub, 'arch', arch, 'model', model, 'count', count,
    'price', ARGV[16], 'expires', expires, 'for', for_job, 'ts', now)
  return expires
end

-- release or expire: give a standing hold's devices back
local h = redis.call('HMGET', KEYS[1], 'state', 'tenant', 'site', 'hub', 'model', 'count', 'expires', 'for')
local state, tenant, site, model, count = h[1], h[2], h[3], h[5], tonumber(h[6] or '0')
local reason, maxlen, now
if action == 'release' then
  if ARGV[3] ~= '' and ARGV[3] ~= tenant then return 0 end
  reason, maxlen, now = ARGV[4], ARGV[5], clock(ARGV[6])
elseif action == 'expire' then
  reason, maxlen, now = ARGV[3], ARGV[4], clock(ARGV[5])
  if state == 'held' and tonumber(h[7]) > now then return 0 end
else
  return redis.error_reply('unknown action ' .. action)
end
if state ~= 'held' then return 0 end
redis.call('HINCRBY', prefix .. 'tenant-usage', tenant, -count)
redis.call('ZREM', prefix .. 'holds', hold_id)
redis.call('ZREM', prefix .. 'tenant:' .. tenant .. ':holds', hold_id)
-- the devices come back on the site's shard next (broker.state.ledger); until then the outbox holds it
local released = 'release\t' .. (h[4] or '') .. '\t' .. site .. '\thold:' .. hold_id .. '\t0'
redis.call('ZADD', prefix .. 'outbox', now, released)
local ended = action == 'release' and 'released' or 'expired'
redis.call('HSET', KEYS[1], 'state', ended, 'ended', now, 'reason', reason)
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', maxlen, '*', 'type', 'hold_' .. ended, 'hold', hold_id,
  'tenant', tenant, 'site', site, 'hub', h[4] or '', 'model', model, 'count', count, 'for', h[8] or '',
  'reason', reason, 'ts', now)
return released
