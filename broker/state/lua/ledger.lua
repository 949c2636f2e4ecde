-- The site shard's other steps (broker.state.ledger), each idempotent: done twice, the second does nothing.
-- KEYS: the hub's prefix ('{ns.hub}:'; every key is derived from it)
-- ARGV: action, site, then
--   release: owner, attempt ('' any) -- give the owner's devices back; 1 when they were given back here
--   settle:  owner, attempt -- the entry is bound on the job shard: off the pending set
--   merge:   owner, attempt, count, then (owner, attempt) of each source -- the sources' devices pass to the
--            owner's entry (made when there is none), which then holds `count` of them; devices beyond that
--            come free. Returns the entry's seq; 0 when the sources are gone and the entry too (done, and
--            ended since), or when the owner has moved on (buried at this attempt, or its entry of a newer
--            one): the sources' devices come free; -1 when the sources are of two models; an error (the step
--            stays in the outbox) while a source is not there yet. An entry of the owner in another model (a
--            stale reservation) is given back.
--   merge-now: as merge, for a step that has waited `MERGE_WAIT_MS` in the outbox: a source still not there
--            is taken as gone (buried at its attempt, so a step that brings it later gives its devices back)
--            and the merge goes on with the others
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

-- Tombstones: an owner a step took off the ledger ahead of a merge that may still come for it (a release that
-- found no entry of its attempt, a hold's release, a merge's sources), with the highest
-- attempt taken off; a merge into or from an owner buried at its attempt knows it is late. Kept an hour.
local gone, gone_at = prefix .. 'gone', prefix .. 'gone-at'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function bury(owner, attempt)
  local f = site .. '\t' .. owner
  local was = redis.call('HGET', gone, f)
  if not was or tonumber(attempt) > tonumber(was) then redis.call('HSET', gone, f, attempt) end
  redis.call('ZADD', gone_at, now_ms(), f)
end
local function buried(owner, attempt)
  local was = redis.call('HGET', gone, site .. '\t' .. owner)
  return was and tonumber(was) >= tonumber(attempt)
end

local function changed()
  redis.call('ZADD', prefix .. 'sites', redis.call('INCR', prefix .. 'clock'), site)
end

if action == 'release' then
  local owner, attempt = ARGV[3], ARGV[4]
  local entry = redis.call('HGET', held, owner)
  if not entry then
    if attempt ~= '' then bury(owner, attempt) end
    return 0
  end
  local a, model, count = parse(entry)
  if attempt ~= '' and a ~= attempt then
    bury(owner, attempt)
    return 0
  end
  -- a hold's release may come ahead of the merge that gives it devices (a preemption's). A job's entry
  -- released here is not buried: a reservation that was never bound leaves its attempt's number to be used
  -- again (by a binding through a hold at this site, whose merge must then make the entry), and a bound
  -- attempt's devices are released only once, after any merge into it
  if string.sub(owner, 1, 5) == 'hold:' then bury(owner, a) end
  redis.call('HDEL', held, owner)
  redis.call('HINCRBY', capacity, 'a:' .. model, -count)
  off_lease(owner, a)
  changed()
  redis.call('INCR', prefix .. 'wake')  -- devices came free: parked jobs are looked at again
  return 1
elseif action == 'settle' then
  return off_lease(ARGV[3], ARGV[4])
elseif action == 'merge' or action == 'merge-now' then
  local owner, attempt, count = ARGV[3], ARGV[4], tonumber(ARGV[5])
  local late = action == 'merge-now'
  local mine = redis.call('HGET', held, owner)
  local sources, waiting, model = {}, false, nil
  for i = 6, #ARGV, 2 do
    local entry = redis.call('HGET', held, ARGV[i])
    local a, m, n
    if entry then a, m, n = parse(entry) end
    if entry and a == ARGV[i + 1] then
      if model and m ~= model then return -1 end
      model = m
      sources[#sources + 1] = {ARGV[i], a, m, n}
    elseif not buried(ARGV[i], ARGV[i + 1]) and not (entry and tonumber(a) > tonumber(ARGV[i + 1])) then
      if late then
        bury(ARGV[i], ARGV[i + 1])  -- waited long enough: the step that would bring it gives it back instead
      else
        waiting = true  -- not here yet: the step that brings it (an older merge) is still in the outbox
      end
    end
  end
  local function give_back()  -- the owner has moved on: the sources' devices come free
    for _, s in ipairs(sources) do
      redis.call('HDEL', held, s[1])
      off_lease(s[1], s[2])
      bury(s[1], s[2])
      redis.call('HINCRBY', capacity, 'a:' .. s[3], -s[4])
    end
    if #sources > 0 then
      changed()
      redis.call('INCR', prefix .. 'wake')
    end
    return 0
  end
  local ma = mine and parse(mine)
  if buried(owner, attempt) or (ma and tonumber(ma) > tonumber(attempt)) then return give_back() end
  if waiting then return redis.error_reply('WAIT a source of the merge is not there yet') end
  if #sources == 0 then
    if not mine then return 0 end
    local _, _, _, seq = parse(mine)
    return tonumber(seq)
  end
  local total = 0
  for _, s in ipairs(sources) do total = total + s[4] end
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
    bury(s[1], s[2])
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
