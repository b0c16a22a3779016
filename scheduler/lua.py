"""The Lua scripts behind every state change of a request, so each change is atomic in Redis.

A request moves queued -> assigned (a dispatcher took it for a worker) -> running (the worker
claimed it) -> done | failed | cancelled, and back to queued when its worker dies or drains.
Ownership is checked on every step (worker id and attempt number), so a late message or a worker
that lost its lease can never record a second result. Keys are built inside the scripts (one Redis,
not Cluster); their layout is documented in `hotswap/keys.py`.
"""

from __future__ import annotations

from hotswap.keys import PREFIX

_COMMON = """
local P = '%(prefix)s'
local function rkey(id) return P .. 'req:' .. id end

local function wake()
  redis.call('LPUSH', P .. 'wake', '1')
  redis.call('LTRIM', P .. 'wake', 0, 0)
end

-- Put a request (its hash already written) on the queue of `qclass`.
local function push(id, qclass)
  local r = rkey(id)
  local f = redis.call('HMGET', r, 'base', 'model_key', 'score', 'tenant')
  local q = P .. 'q:' .. f[1] .. ':' .. qclass .. ':' .. f[2]
  redis.call('ZADD', q, f[3], id)
  redis.call('SADD', P .. 'qidx:' .. f[1], q)
  redis.call('HSET', r, 'state', 'queued', 'qclass', qclass, 'queue', q, 'worker', '')
  redis.call('INCR', P .. 'waiting:' .. qclass)
  redis.call('INCR', P .. 'waiting:' .. qclass .. ':' .. f[4])
  wake()
end

-- Take a queued request off its queue (the caller changes its state).
local function unqueue(id)
  local r = rkey(id)
  local f = redis.call('HMGET', r, 'queue', 'qclass', 'tenant', 'base')
  if redis.call('ZREM', f[1], id) == 1 then
    redis.call('DECR', P .. 'waiting:' .. f[2])
    redis.call('DECR', P .. 'waiting:' .. f[2] .. ':' .. f[3])
    if redis.call('ZCARD', f[1]) == 0 then redis.call('SREM', P .. 'qidx:' .. f[4], f[1]) end
  end
end

-- Forget that worker `wid` holds the request.
local function unassign(id, wid)
  local r = rkey(id)
  local w = P .. 'w:' .. wid
  redis.call('SREM', w .. ':inflight', id)
  redis.call('ZREM', P .. 'assigned', id)
  local mk = redis.call('HGET', r, 'model_key')
  if redis.call('HINCRBY', w .. ':models', mk, -1) <= 0 then redis.call('HDEL', w .. ':models', mk) end
  if redis.call('GET', w .. ':isolated') == id then redis.call('DEL', w .. ':isolated') end
  redis.call('HSET', r, 'worker', '')
  wake()
end

-- Record the one and only result of a request and tell its readers.
local function finalize(id, state, result, ttl)
  local r = rkey(id)
  local out = P .. 'out:' .. id
  redis.call('HSET', r, 'state', state, 'result', result)
  redis.call('XADD', out, '*', 'result', result)
  redis.call('EXPIRE', r, ttl)
  redis.call('EXPIRE', out, ttl)
  local batch = redis.call('HGET', r, 'batch_id')
  if batch and batch ~= '' then redis.call('RPUSH', P .. 'job:' .. batch .. ':finished', id) end
end

local function plain_result(id, status, extra)
  local f = redis.call('HMGET', rkey(id), 'attempts', 'score')
  local res = {id = id, status = status, attempts = tonumber(f[1]) or 0, queued_at = tonumber(f[2]) or 0,
               finished_at = tonumber(ARGV[#ARGV])}
  for k, v in pairs(extra) do res[k] = v end
  return cjson.encode(res)
end
""" % {"prefix": PREFIX}

# ARGV: id, spec, base, model_key, qclass, score, tenant, batch_id, cap_class, cap_tenant
ENQUEUE = _COMMON + """
local id, qclass, tenant = ARGV[1], ARGV[5], ARGV[7]
local r = rkey(id)
if redis.call('EXISTS', r) == 1 then return 'exists' end
local cap_class, cap_tenant = tonumber(ARGV[9]), tonumber(ARGV[10])
if cap_class > 0 and tonumber(redis.call('GET', P .. 'waiting:' .. qclass) or '0') >= cap_class then
  return 'full'
end
if cap_tenant > 0 and tonumber(redis.call('GET', P .. 'waiting:' .. qclass .. ':' .. tenant) or '0') >= cap_tenant then
  return 'full_tenant'
end
redis.call('HSET', r, 'spec', ARGV[2], 'base', ARGV[3], 'model_key', ARGV[4], 'score', ARGV[6],
           'tenant', tenant, 'batch_id', ARGV[8], 'attempts', 0, 'home_class', qclass, 'cancel', 0)
push(id, qclass)
return 'ok'
"""

# ARGV: queue, n, wid, max_inflight, isolate (0/1), now
TAKE = _COMMON + """
local q, wid = ARGV[1], ARGV[3]
local w = P .. 'w:' .. wid
if redis.call('EXISTS', w .. ':alive') == 0 then return {} end
local n = math.min(tonumber(ARGV[2]), tonumber(ARGV[4]) - redis.call('SCARD', w .. ':inflight'))
if n <= 0 then return {} end
local ids = redis.call('ZRANGE', q, 0, n - 1)
for _, id in ipairs(ids) do
  unqueue(id)
  local r = rkey(id)
  redis.call('HSET', r, 'state', 'assigned', 'worker', wid, 'assigned_at', ARGV[6])
  redis.call('SADD', w .. ':inflight', id)
  redis.call('HINCRBY', w .. ':models', redis.call('HGET', r, 'model_key'), 1)
  redis.call('ZADD', P .. 'assigned', ARGV[6], id)
  if ARGV[5] == '1' then redis.call('SET', w .. ':isolated', id) end
end
return ids
"""

# ARGV: id, wid, now -> {spec, attempts} or false
CLAIM = _COMMON + """
local r = rkey(ARGV[1])
local f = redis.call('HMGET', r, 'state', 'worker', 'spec', 'attempts')
if f[1] ~= 'assigned' or f[2] ~= ARGV[2] then return false end
redis.call('HSET', r, 'state', 'running', 'started_at', ARGV[3])
redis.call('ZREM', P .. 'assigned', ARGV[1])
return {f[3], f[4]}
"""

# ARGV: id, wid, attempt, state, result, ttl -> 1 recorded, 0 not the owner (stale or duplicate)
COMPLETE = _COMMON + """
local id, wid = ARGV[1], ARGV[2]
local f = redis.call('HMGET', rkey(id), 'state', 'worker', 'attempts')
if f[1] ~= 'running' or f[2] ~= wid or f[3] ~= ARGV[3] then return 0 end
unassign(id, wid)
finalize(id, ARGV[4], ARGV[5], tonumber(ARGV[6]))
return 1
"""

# Give a request back: its worker died (count=1: a crash counts as an attempt if it was running),
# drained, or never claimed it. ARGV: id, wid, count, max_attempts, isolate_after, ttl, now
REQUEUE = _COMMON + """
local id, wid = ARGV[1], ARGV[2]
local r = rkey(id)
local f = redis.call('HMGET', r, 'state', 'worker', 'attempts', 'cancel', 'home_class')
if f[2] ~= wid or (f[1] ~= 'assigned' and f[1] ~= 'running') then return 'skip' end
unassign(id, wid)
local attempts = tonumber(f[3])
if ARGV[3] == '1' and f[1] == 'running' then attempts = redis.call('HINCRBY', r, 'attempts', 1) end
local ttl = tonumber(ARGV[6])
if f[4] == '1' then
  finalize(id, 'cancelled', plain_result(id, 'cancelled', {finish_reason = 'abort'}), ttl)
  return 'cancelled'
end
if attempts >= tonumber(ARGV[4]) then
  local msg = 'the request was running on a worker that crashed, ' .. attempts ..
              ' times; it is not retried (dead-letter)'
  finalize(id, 'failed', plain_result(id, 'failed', {error = {code = 'dead_letter', message = msg}}), ttl)
  redis.call('ZADD', P .. 'dead', ARGV[7], id)
  return 'dead'
end
local qclass = f[5]
if attempts >= tonumber(ARGV[5]) then qclass = 'suspect' end
redis.call('HSET', r, 'requeued_at', ARGV[7])
push(id, qclass)
return 'requeued'
"""

# ARGV: id, tenant ('' = any), ttl, now -> 'cancelled' | 'cancelling' | 'unknown' | final state
CANCEL = _COMMON + """
local id = ARGV[1]
local r = rkey(id)
local f = redis.call('HMGET', r, 'state', 'tenant', 'worker')
if not f[1] or (ARGV[2] ~= '' and f[2] ~= ARGV[2]) then return 'unknown' end
local ttl = tonumber(ARGV[3])
if f[1] == 'queued' then
  unqueue(id)
elseif f[1] == 'assigned' then
  unassign(id, f[3])
elseif f[1] == 'running' then
  redis.call('HSET', r, 'cancel', 1)
  redis.call('RPUSH', P .. 'w:' .. f[3] .. ':cancels', id)
  return 'cancelling'
else
  return f[1]
end
finalize(id, 'cancelled', plain_result(id, 'cancelled', {finish_reason = 'abort'}), ttl)
return 'cancelled'
"""

# A lease held in one key (the job runner's): renewed or released only by its holder.
# KEYS: the lease key; ARGV: holder id, ttl ms (renew) -> 1 done, 0 not the holder
RENEW_LEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
RELEASE_LEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
