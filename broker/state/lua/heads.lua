-- The head of every tenant's queue for one pass of one replica, claimed for it: no two replicas match the
-- same job in the same moment. A job is claimed by writing `claim` = '<replica> <until_ms>' on it; a job
-- claimed by another replica until later than now is passed over, so replicas divide the queue instead of
-- all matching the same heads (their commits would be refused). A dead replica's claims lapse after
-- `claim_ms`, and its jobs are then read by the others: no job waits longer than that for a live replica.
-- Each tenant gets an equal share of `batch` (at least 4) of its window, and as many again of its parked
-- jobs that capacity may have grown for since they were parked (those come after the window, with the
-- `wake` generation they were parked at as their score). At most three shares of each are looked at.
-- KEYS: prefix ('{ns}:'), queued_tenants, tenant_usage, tenant_limits
-- ARGV: replica, batch, max_tenants, claim_ms, wake (the generation as the caller last read it: the job
--       shard's and every hub's counters summed, broker.state.sites)
-- Returns {usage (flat hash), limits (flat hash), {job, position, score, tenant, attempt, ...}, the number of
-- tenants with queued jobs here} (with several job shards, the caller shares its batch among the shards by
-- that number: each tenant's share is then alike whatever its shard).
local replica, batch, claim_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local usage = redis.call('HGETALL', KEYS[3])
local limits = redis.call('HGETALL', KEYS[4])
local tenants = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
local heads = {}
local queued_tenants = redis.call('ZCARD', KEYS[2])
if #tenants == 0 then
  return {usage, limits, heads, queued_tenants}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local claim = replica .. ' ' .. string.format('%d', now + claim_ms)
local per = math.max(4, math.floor(batch / #tenants))
local wake = ARGV[5] or '0'

local function free(job)
  local held = redis.call('HGET', KEYS[1] .. 'job:' .. job, 'claim')
  if not held then
    return true
  end
  local sep = string.find(held, ' ', 1, true)
  return string.sub(held, 1, sep - 1) == replica or tonumber(string.sub(held, sep + 1)) < now
end

local function take(tenant, rows, first)
  local taken = 0
  for i = 1, #rows, 2 do
    if taken >= per then
      break
    end
    local job = rows[i]
    if free(job) then
      redis.call('HSET', KEYS[1] .. 'job:' .. job, 'claim', claim)
      heads[#heads + 1] = job
      heads[#heads + 1] = first + taken
      heads[#heads + 1] = rows[i + 1]
      heads[#heads + 1] = tenant
      heads[#heads + 1] = redis.call('HGET', KEYS[1] .. 'job:' .. job, 'attempt') or '0'
      taken = taken + 1
    end
  end
end

for _, tenant in ipairs(tenants) do
  local base = KEYS[1] .. 'tenant:' .. tenant
  take(tenant, redis.call('ZRANGE', base .. ':queue', 0, per * 3 - 1, 'WITHSCORES'), 0)
  take(tenant, redis.call('ZRANGEBYSCORE', base .. ':parked', '-inf', '(' .. wake, 'WITHSCORES', 'LIMIT', 0, per * 3), per)
end
return {usage, limits, heads, queued_tenants}
