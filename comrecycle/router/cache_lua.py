"""The Lua scripts of the Redis stage cache (router.cache): one script call per batch for the claim
(lock + read + parked feedback), the commit (write + unlock), the lock extension and the release.
Each runs atomically in Redis, so two routers never both hold a user's lock."""

# Deletes each lock in KEYS that still holds the caller's token (ARGV[1]): a request whose lock
# expired and was taken by a newer request of the same user must not release the newer one's lock.
RELEASE_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""

# Per user, KEYS holds (lock key, entry key, parked-feedback key). ARGV[1]: the batch's token,
# ARGV[2]: the lock's lifetime (ms), ARGV[3]: the largest entry kept (bytes), ARGV[4]: the parked
# feedback's lifetime (ms), ARGV[5]: its cap (bytes); then per user k: ARGV[4 + 2k] the mode
# ('n': a new session, which reads nothing; 'o': an ongoing one) and ARGV[5 + 2k] the viewed items
# it reports (packed int64). First a key that is not one of our entries (another Redis type,
# oversize) is deleted. Then the lock: taken -> {1, entry, parked feedback (taken over), repaired,
# parked length}: the claim's own viewed items are appended to the parked key, which keeps all it
# took over until the write-back trims that prefix (so requests that find the lock held before the
# write-back know them); held by someone else -> the viewed items are parked and
# {0, entry, parked, repaired, 0} is returned for exclusions. A user twice in one batch is busy the
# second time.
CLAIM_LUA = """
local out = {}
local max_bytes, cap = tonumber(ARGV[3]), tonumber(ARGV[5])
for i = 1, #KEYS, 3 do
  local k = (i + 2) / 3
  local mode, viewed = ARGV[4 + 2 * k], ARGV[5 + 2 * k]
  local lock, entry, parked = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local repaired = 0
  local t = redis.call('TYPE', entry)['ok']
  if t ~= 'none' and t ~= 'string' then
    redis.call('DEL', entry)
    repaired = 1
  elseif t == 'string' and redis.call('STRLEN', entry) > max_bytes then
    redis.call('DEL', entry)
    repaired = 2
  end
  local pt = redis.call('TYPE', parked)['ok']
  if pt ~= 'none' and pt ~= 'string' then
    redis.call('DEL', parked)
  end
  if redis.call('SET', lock, ARGV[1], 'NX', 'PX', ARGV[2]) then
    if mode == 'n' then
      redis.call('DEL', parked)
      out[#out + 1] = {1, false, false, repaired, 0}
    else
      local p = redis.call('GET', parked)
      if #viewed > 0 then
        redis.call('APPEND', parked, viewed)
        redis.call('PEXPIRE', parked, ARGV[4])
      end
      out[#out + 1] = {1, redis.call('GET', entry), p, repaired, redis.call('STRLEN', parked)}
    end
  elseif mode == 'n' then
    out[#out + 1] = {0, false, false, repaired, 0}
  else
    if #viewed > 0 then
      redis.call('APPEND', parked, viewed)
      local n = redis.call('STRLEN', parked)
      if n > cap then
        redis.call('SET', parked, redis.call('GETRANGE', parked, n - cap, n - 1))
      end
      redis.call('PEXPIRE', parked, ARGV[4])
    end
    out[#out + 1] = {0, redis.call('GET', entry), redis.call('GET', parked), repaired, 0}
  end
end
return out
"""

# KEYS: per write (entry key, lock key, parked key), then the lock keys to release only. ARGV[1]:
# the batch's token, ARGV[2]: the entries' TTL (ms), ARGV[3]: n, the number of writes, ARGV[3 + i]:
# the i-th payload (empty = delete), ARGV[3 + n + i]: the first 8 bytes (magic + crc) of the entry
# the batch read ('' = none, '-' = not given), ARGV[3 + 2n + i]: the parked length the claim saw
# (that prefix is now in the entry: trimmed after the write). An entry is written while its lock holds the token, or,
# when the lock is gone (expired, evicted under maxmemory) and nobody else holds it, if the entry
# is still the one the batch read: a batch that lost the race to another request of the user must
# not overwrite that request's state. Returns {written, lost}.
COMMIT_LUA = """
local n = tonumber(ARGV[3])
local written, lost = 0, 0
for i = 1, n do
  local entry, lock, parked = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local holder = redis.call('GET', lock)
  local ours = holder == ARGV[1]
  if not holder then
    local expect = ARGV[3 + n + i]
    ours = expect ~= '-' and redis.call('GETRANGE', entry, 0, 7) == expect
  end
  if ours then
    local data = ARGV[3 + i]
    if data == '' then
      redis.call('DEL', entry)
    else
      redis.call('SET', entry, data, 'PX', ARGV[2])
    end
    local applied = tonumber(ARGV[3 + 2 * n + i])
    if applied > 0 and redis.call('TYPE', parked)['ok'] == 'string' then
      local len = redis.call('STRLEN', parked)
      if len <= applied then
        redis.call('DEL', parked)
      else
        redis.call('SET', parked, redis.call('GETRANGE', parked, applied, len - 1), 'KEEPTTL')
      end
    end
    redis.call('DEL', lock)
    written = written + 1
  else
    lost = lost + 1
  end
end
for i = 3 * n + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return {written, lost}
"""

# Extends each lock in KEYS that still holds the token ARGV[1] to ARGV[2] ms; returns how many.
EXTEND_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('PEXPIRE', key, ARGV[2])
  end
end
return n
"""
