"""The Lua scripts behind ``RedisAccounting``: each check-and-take runs as one script, so it is atomic across
replicas. Times are Redis server milliseconds (``TIME``), so replicas with skewed clocks agree.

Per device (``<p>`` is the key prefix; every key expires on its own, no sweeper):
    <p>dev:<id>:leases     ZSET call_sid -> lease expiry (ms)        pruned by every script; heartbeat refreshes
    <p>dev:<id>:reserved   ZSET call_sid -> reservation expiry (ms)  pruned by every script; claim moves to leases
    <p>dev:<id>:tokens     ZSET "<ms>-<seq>" -> taken at (ms)        pruned to the window; PEXPIRE window
    <p>dev:<id>:seq        counter making token members unique       PEXPIRE window
    <p>dev:<id>:exhausted  "1" while Savants said 429                PX for_s
    <p>sticky:<sha256>     device_id of a caller's last call         PX sticky_ttl
"""

from __future__ import annotations

DEVICE_KEYS = ("leases", "reserved", "tokens", "exhausted", "seq")  # the order ADMIT and SNAPSHOT take them in

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- integers as plain digits: Lua's tostring turns large numbers into 1.7e+12
local function ms(x) return string.format('%d', x) end
-- slot sets hold call_sid -> expiry: whatever has expired is gone before anyone counts
local function prune_slots(key, now) redis.call('ZREMRANGEBYSCORE', key, '-inf', ms(now)) end
-- a slot set lives as long as its longest-lived member, so an idle pool leaves nothing behind
local function expire_with_members(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIREAT', key, ms(tonumber(top[2]) + 1000)) end
end
-- ms until the device may take a token request: its window is full, or Savants said 429
local function token_wait_ms(tokens, exhausted, now, max_tokens, window)
  redis.call('ZREMRANGEBYSCORE', tokens, '-inf', ms(now - window))
  local wait = redis.call('PTTL', exhausted)
  if wait < 0 then wait = 0 end
  if redis.call('ZCARD', tokens) >= max_tokens then
    local oldest = redis.call('ZRANGE', tokens, 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
  return wait
end
-- record one token request unless the device has no budget: 0 if taken, else ms until one frees
local function take_token(tokens, exhausted, seq, now, max_tokens, window)
  local wait = token_wait_ms(tokens, exhausted, now, max_tokens, window)
  if wait > 0 then return wait end
  local n = redis.call('INCR', seq)
  redis.call('PEXPIRE', seq, ms(window))
  redis.call('ZADD', tokens, ms(now), ms(now) .. '-' .. n)
  redis.call('PEXPIRE', tokens, ms(window))
  return 0
end
"""

# KEYS: sticky key, then DEVICE_KEYS for each device. ARGV: call_sid, mode (reserve|claim|acquire|move),
# reserve_ttl_ms, lease_ttl_ms, max_concurrent, max_tokens, window_ms, sticky_ttl_ms (0: no sticky key),
# token need (none|check|take), then the device ids. Returns {status, device_id, token taken (0/1) or, for
# full, how many devices had a free slot}: leased | reserved | none (claim or move found nothing) | full.
ADMIT = (
    _COMMON
    + """
local sid, mode = ARGV[1], ARGV[2]
local reserve_ttl, lease_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_conc, max_tokens, window = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local sticky_ttl, need = tonumber(ARGV[8]), ARGV[9]
local n = #ARGV - 9
local now = now_ms()
local function key(i, j) return KEYS[1 + (i - 1) * 5 + j] end
local function device(i) return ARGV[9 + i] end
local function take(i)
  if need ~= 'take' then return 0 end
  if take_token(key(i, 3), key(i, 4), key(i, 5), now, max_tokens, window) == 0 then return 1 end
  return 0
end

for i = 1, n do
  prune_slots(key(i, 1), now)
  prune_slots(key(i, 2), now)
end
local from = nil  -- move: the device the call leaves
if mode == 'move' then
  for i = 1, n do
    if redis.call('ZSCORE', key(i, 1), sid) then from = i end
  end
  if from == nil then return {'none', '', 0} end
else
  -- idempotent: this call already holds a slot somewhere
  for i = 1, n do
    if redis.call('ZSCORE', key(i, 1), sid) then return {'leased', device(i), take(i)} end
    local expires = redis.call('ZSCORE', key(i, 2), sid)
    if expires then
      if mode == 'reserve' then  -- a retried webhook: keep the reservation, never shorten it
        if now + reserve_ttl > tonumber(expires) then
          redis.call('ZADD', key(i, 2), ms(now + reserve_ttl), sid)
          expire_with_members(key(i, 2))
        end
        return {'reserved', device(i), take(i)}
      end
      redis.call('ZREM', key(i, 2), sid)
      redis.call('ZADD', key(i, 1), ms(now + lease_ttl), sid)
      expire_with_members(key(i, 1))
      return {'leased', device(i), take(i)}
    end
  end
  if mode == 'claim' then return {'none', '', 0} end
end

-- choose: token budget first, then the caller's last device, then least loaded, fewest tokens, pool order
local sticky = false
if sticky_ttl > 0 then sticky = redis.call('GET', KEYS[1]) end
local best, best_rank, free = nil, nil, 0
for i = 1, n do
  local load = redis.call('ZCARD', key(i, 1)) + redis.call('ZCARD', key(i, 2))
  if load < max_conc and i ~= from then
    free = free + 1
    local no_budget = 0
    if token_wait_ms(key(i, 3), key(i, 4), now, max_tokens, window) > 0 then no_budget = 1 end
    local not_sticky = 1
    if device(i) == sticky then not_sticky = 0 end
    local rank = {no_budget, not_sticky, load, redis.call('ZCARD', key(i, 3)), i}
    local better = best_rank == nil
    if not better then
      for r = 1, 5 do
        if rank[r] ~= best_rank[r] then better = rank[r] < best_rank[r]; break end
      end
    end
    if better and (need == 'none' or no_budget == 0) then best, best_rank = i, rank end
  end
end
if best == nil then
  if mode == 'move' then return {'none', '', 0} end
  return {'full', '', free}
end
if mode == 'reserve' then
  redis.call('ZADD', key(best, 2), ms(now + reserve_ttl), sid)
  expire_with_members(key(best, 2))
else
  if from ~= nil then redis.call('ZREM', key(from, 1), sid) end
  redis.call('ZADD', key(best, 1), ms(now + lease_ttl), sid)
  expire_with_members(key(best, 1))
end
if sticky_ttl > 0 then redis.call('SET', KEYS[1], device(best), 'PX', ms(sticky_ttl)) end
local taken = take(best)
if mode == 'reserve' then return {'reserved', device(best), taken} end
return {'leased', device(best), taken}
"""
)

# KEYS: tokens, exhausted, seq. ARGV: max_tokens, window_ms. Returns 0 if taken, else ms until one frees.
TAKE_TOKEN = (
    _COMMON
    + """
return take_token(KEYS[1], KEYS[2], KEYS[3], now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2]))
"""
)

# KEYS: leases, reserved. ARGV: call_sid. Returns how many slots it freed (0 when released twice).
RELEASE = """
return redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: the reserved set of each device. ARGV: call_sid. Returns how many reservations it dropped (0 or 1).
RELEASE_RESERVATION = """
local dropped = 0
for i = 1, #KEYS do dropped = dropped + redis.call('ZREM', KEYS[i], ARGV[1]) end
return dropped
"""

# KEYS: leases, reserved. ARGV: call_sid, lease_ttl_ms, max_concurrent.
# Returns 1 (held, refreshed), 2 (had expired, taken again: the call's socket is still open on Savants, so
# counting it again is the truth), 0 (had expired and the device is full now).
HEARTBEAT = (
    _COMMON
    + """
local sid, lease_ttl, max_conc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
prune_slots(KEYS[1], now)
prune_slots(KEYS[2], now)
local status = 1
if not redis.call('ZSCORE', KEYS[1], sid) then
  if redis.call('ZREM', KEYS[2], sid) == 0 then
    if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= max_conc then return 0 end
    status = 2
  end
end
redis.call('ZADD', KEYS[1], ms(now + lease_ttl), sid)
expire_with_members(KEYS[1])
return status
"""
)

# KEYS: exhausted. ARGV: for_ms. Extends, never shortens, the device's pause.
EXHAUST = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
"""

# KEYS: DEVICE_KEYS for each device. ARGV: window_ms.
# Returns, per device, {leased call_sids, reserved call_sids, tokens in window, exhausted ms left (<0: none)}.
SNAPSHOT = (
    _COMMON
    + """
local window = tonumber(ARGV[1])
local now = now_ms()
local out = {}
for i = 1, #KEYS / 5 do
  local b = (i - 1) * 5
  prune_slots(KEYS[b + 1], now)
  prune_slots(KEYS[b + 2], now)
  redis.call('ZREMRANGEBYSCORE', KEYS[b + 3], '-inf', ms(now - window))
  out[i] = {
    redis.call('ZRANGE', KEYS[b + 1], 0, -1),
    redis.call('ZRANGE', KEYS[b + 2], 0, -1),
    redis.call('ZCARD', KEYS[b + 3]),
    redis.call('PTTL', KEYS[b + 4]),
  }
end
return out
"""
)
