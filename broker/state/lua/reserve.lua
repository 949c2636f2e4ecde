-- Step one of a two-step allocation (broker.state.ledger): take `count` devices of `model` at a site of this
-- hub for an owner (a job's next attempt, or `hold:<id>`), on a lease: the job shard's step (bind.lua, or
-- hold.lua's take, or preempt.lua) must come before the lease ends, and refuses after it; an entry not known
-- bound when its lease is over is settled or released by the sweeper. Pools are tried in order (the chosen
-- one, then its runners-up on this hub) until one can take it.
-- Idempotent by call: the same call (its id, ARGV[5]) sent again while the entry is on its lease is
-- answered what it was the first time.
-- KEYS: the hub's prefix ('{ns.hub}:'; every key is derived from it)
-- ARGV: owner, attempt, lease_ms, headroom (the most devices the owner's tenant may still take, as the caller
--       last read it: a pool asking more is passed over; '' none; bind.lua checks the limit itself), the
--       call's id, then per pool: site, model, count
-- Returns {choice (0 for the first pool), seq, lease_end_ms}, or the first pool's refusal: 0 too few devices
-- free, -2 the site is not online, -3 more than the headroom, -8 an entry of the owner is already there for
-- an earlier attempt (its release is on its way), or for this one but settled or of another pool: the
-- caller neither binds nor releases it, and tries again later.
local prefix, owner, attempt, lease, headroom = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local call = ARGV[5]
local t = redis.call('TIME')  -- the lease is judged by Redis's clock, the job shard's step by its own
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pools = {}
for i = 6, #ARGV, 3 do
  pools[#pools + 1] = {ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])}
end
for i, pool in ipairs(pools) do
  local entry = redis.call('HGET', prefix .. 'site:' .. pool[1] .. ':held', owner)
  if entry then
    local a, model, count, seq = string.match(entry, '^(%S+) (%S+) (%S+) (%S+)$')
    if a ~= attempt then return -8 end
    local member = pool[1] .. '\t' .. owner .. '\t' .. attempt
    local due = redis.call('ZSCORE', prefix .. 'pending', member)
    -- the same call sent again (its reply lost) while the entry is on its lease: the same reservation. Any
    -- other caller is refused it, so a reservation has one binder (were two to share it, the one refused
    -- would release what the other bound); so is an entry already settled, or of another pool
    if not due or model ~= pool[2] or tonumber(count) ~= pool[3]
        or redis.call('HGET', prefix .. 'reservations', member) ~= call then
      return -8
    end
    return {i - 1, tonumber(seq), tonumber(due)}
  end
end
local refusal
for i, pool in ipairs(pools) do
  local site, model, count = pool[1], pool[2], pool[3]
  local code
  if redis.call('HGET', prefix .. 'site:' .. site, 'status') ~= 'online' then
    code = -2
  elseif headroom and count > headroom then
    code = -3
  else
    local capacity = prefix .. 'cap:' .. site
    local cap = redis.call('HMGET', capacity, 't:' .. model, 'x:' .. model, 'a:' .. model)
    local usable = tonumber(cap[1] or '0') - tonumber(cap[2] or '0')
    if usable - tonumber(cap[3] or '0') < count then
      code = 0
    else
      redis.call('HINCRBY', capacity, 'a:' .. model, count)
      -- what the pool could hold when the broker last allocated there: allocated above it would be the
      -- broker's fault, below it a site that shrank afterwards (audit tells them apart)
      redis.call('HSET', capacity, 'p:' .. model, usable)
      local seq = redis.call('HINCRBY', prefix .. 'site:' .. site, 'aseq', 1)
      redis.call('HSET', prefix .. 'site:' .. site .. ':held', owner,
        attempt .. ' ' .. model .. ' ' .. count .. ' ' .. seq)
      local due = now + lease
      redis.call('ZADD', prefix .. 'pending', due, site .. '\t' .. owner .. '\t' .. attempt)
      redis.call('HSET', prefix .. 'reservations', site .. '\t' .. owner .. '\t' .. attempt, call)
      redis.call('ZADD', prefix .. 'sites', redis.call('INCR', prefix .. 'clock'), site)
      return {i - 1, seq, due}
    end
  end
  refusal = refusal or code
end
return refusal or 0
