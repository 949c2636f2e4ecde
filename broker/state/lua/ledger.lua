-- The site shard's other steps (broker.state.ledger), each idempotent: done twice, the second does nothing.
-- KEYS: the hub's prefix ('{ns.hub}:'; every key is derived from it)
-- ARGV: action, site, then
--   release: owner, attempt ('' any) -- give the owner's devices back; 1 when they were given back here
--   settle:  owner, attempt -- the entry is bound on the job shard: off the pending set
--   merge:   owner, attempt, count, then (owner, attempt) of each source -- the sources' devices pass to the
--            owner's entry (made when there is none), which then holds `count` of them; devices beyond that
--            come free. Returns the entry's seq; 0 when the sources are gone and the entry too (done, and
--            ended since); -1 when some but not all sources are there, or of two models. An entry of the
--            owner in another model (a stale reservation) is given back.
--   recheck: -- every entry of every site of the hub goes to the pending set, due now unless already on
--            its lease: after a new primary, the sweeper checks each against the job shard
local prefix, action, site = KEYS[1], ARGV[1], ARGV[2]
local held = prefix .. 'site:' .. site .. ':held'
local capacity = prefix .. 'cap:' .. site

local function parse(entry)
  local a, model, count, seq = string.match(entry, '^(%S+) (%S+) (%S+) (%S+)$')
  return a, model, tonumber(count), seq
end

local function off_lease(owner, attempt)
  local member = site .. '\t' .. owner .. '\t' .. attempt
  redis.call('HDEL', prefix .. 'reservations', member)
  return redis.call('ZREM', prefix .. 'pending', member)
end

local function changed()
  redis.call('ZADD', prefix .. 'sites', redis.call('INCR', prefix .. 'clock'), site)
end

if action == 'release' then
  local owner, attempt = ARGV[3], ARGV[4]
  local entry = redis.call('HGET', held, owner)
  if not entry then return 0 end
  local a, model, count = parse(entry)
  if attempt ~= '' and a ~= attempt then return 0 end
  redis.call('HDEL', held, owner)
  redis.call('HINCRBY', capacity, 'a:' .. model, -count)
  off_lease(owner, a)
  changed()
  redis.call('INCR', prefix .. 'wake')  -- devices came free: parked jobs are looked at again
  return 1
elseif action == 'settle' then
  return off_lease(ARGV[3], ARGV[4])
elseif action == 'merge' then
  local owner, attempt, count = ARGV[3], ARGV[4], tonumber(ARGV[5])
  local found, total, model = 0, 0, nil
  local sources = {}
  for i = 6, #ARGV, 2 do
    local entry = redis.call('HGET', held, ARGV[i])
    if entry then
      local a, m, n = parse(entry)
      if a ~= ARGV[i + 1] or (model and m ~= model) then return -1 end
      model = m
      found = found + 1
      total = total + n
      sources[#sources + 1] = {ARGV[i], a}
    end
  end
  local mine = redis.call('HGET', held, owner)
  if found == 0 then
    if not mine then return 0 end
    local _, _, _, seq = parse(mine)
    return tonumber(seq)
  end
  if found ~= (#ARGV - 5) / 2 then return -1 end
  local have, seq = 0, nil
  if mine then
    local a, m, n, s = parse(mine)
    off_lease(owner, a)
    if m ~= model then
      -- the owner's entry of another model: a reservation of a stopped try, or an earlier attempt's whose
      -- release is on its way; neither can be bound now that the merge's attempt is, so its devices come free
      redis.call('HINCRBY', capacity, 'a:' .. m, -n)
      redis.call('INCR', prefix .. 'wake')
      mine = nil
    else
      have, seq = n, tonumber(s)
    end
  end
  if not mine then
    seq = redis.call('HINCRBY', prefix .. 'site:' .. site, 'aseq', 1)
  end
  for _, s in ipairs(sources) do
    redis.call('HDEL', held, s[1])
    off_lease(s[1], s[2])
  end
  redis.call('HSET', held, owner, attempt .. ' ' .. model .. ' ' .. count .. ' ' .. seq)
  local spare = have + total - count
  if spare ~= 0 then
    redis.call('HINCRBY', capacity, 'a:' .. model, -spare)
  end
  changed()
  if spare > 0 then redis.call('INCR', prefix .. 'wake') end
  return seq
elseif action == 'recheck' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local n = 0
  for _, s in ipairs(redis.call('ZRANGE', prefix .. 'sites', 0, -1)) do
    local rows = redis.call('HGETALL', prefix .. 'site:' .. s .. ':held')
    for i = 1, #rows, 2 do
      local a = parse(rows[i + 1])
      n = n + redis.call('ZADD', prefix .. 'pending', 'NX', now, s .. '\t' .. rows[i] .. '\t' .. a)
    end
  end
  return n
end
return redis.error_reply('unknown action ' .. action)
