-- budget_take: charge a client's units of a sharded item where that client's budget is counted.
-- A sharded item's reservations are spread over its shards by user (shards.py), but a client ip
-- or device must be counted in one place to be exact: each is counted in the shard its own key
-- picks (budgets.py). This script checks and takes the ip and/or device budget counted in this
-- slot, atomically, and records the charge so that it is given back once and only once (refusal,
-- cancel, expiry: lua/budget_give.lua). The hold itself is then made in the user's shard.
-- KEYS[1] sale hash (this slot's copy: ip_rate)   fs:{T}:sale
-- KEYS[2] item hash (limits, counters)            fs:{T}:item:SKU
-- KEYS[3] charges hash  rid -> json {qty, ip, device}   fs:{T}:charges:SKU
-- KEYS[4] pending zset  rid -> ms taken (the hold not yet known made)   fs:{T}:pending:SKU
-- KEYS[5] client ip units   fs:{T}:ips:SKU     KEYS[6] client device units   fs:{T}:devices:SKU
-- KEYS[7] ip rate counter   fs:{T}:iprate:IP   (a never-used key when no rate is counted here)
-- ARGV[1] rid   ARGV[2] quantity   ARGV[3] ip key whose units are counted here ('' for none)
-- ARGV[4] device counted here ('' for none)   ARGV[5] ip key whose attempts a second are counted
--         here ('' for none: ip_rate_per_s is the sale's, counted in its own slot)
-- Returns {'ok'} or {'err', code, number} (limit_exceeded: units left; rate_limited: retry ms).
-- A refusal counts the attempt and the rejection in this slot's item hash (no hold is tried).
local rid, qty, ip, device, rate_ip = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
if redis.call('HEXISTS', KEYS[3], rid) == 1 then return {'ok'} end  -- sent twice: charged once
local limits = redis.call('HMGET', KEYS[2], 'per_ip_limit', 'per_device_limit')
local function reject(code, n)
  redis.call('HINCRBY', KEYS[2], 'attempts', 1)
  redis.call('HINCRBY', KEYS[2], 'rej:' .. code, 1)
  return {'err', code, n}
end
local ip_rate = tonumber(redis.call('HGET', KEYS[1], 'ip_rate') or '0')
if rate_ip ~= '' and ip_rate > 0 then
  local n = redis.call('INCR', KEYS[7])
  if n == 1 then redis.call('PEXPIRE', KEYS[7], 1000) end
  if n > ip_rate then return reject('rate_limited', redis.call('PTTL', KEYS[7])) end
end
local function left(key, who, cap)
  cap = tonumber(cap or '0')
  if who == '' or cap <= 0 then return nil end
  local used = tonumber(redis.call('HGET', key, who) or '0')
  if used + qty > cap then return cap - used end
  return nil
end
if ip == '' and device == '' then return {'ok'} end  -- only the rate is counted here: nothing to give back
local short = left(KEYS[5], ip, limits[1]) or left(KEYS[6], device, limits[2])
if short then return reject('limit_exceeded', short) end
if ip ~= '' then redis.call('HINCRBY', KEYS[5], ip, qty) end
if device ~= '' then redis.call('HINCRBY', KEYS[6], device, qty) end
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], rid, cjson.encode({qty = qty, ip = ip, device = device}))
redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), rid)
return {'ok'}
