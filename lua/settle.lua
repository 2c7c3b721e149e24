-- settle: move reservations out of 'held' (confirm, cancel, expire), atomically and idempotently.
-- Cancel and expire give the units back to stock at once; confirm after expires_at is refused
-- (and the hold expired on the spot) even if the sweeper has not got to it yet.
-- KEYS[1] item hash         fs:{S}:item:SKU
-- KEYS[2] user units hash   fs:{S}:users:SKU
-- KEYS[3] holds zset        fs:{S}:holds:SKU
-- KEYS[4] event stream      fs:{S}:events
-- KEYS[5] client ip units     fs:{S}:ips:SKU       KEYS[6] client device units fs:{S}:devices:SKU
-- KEYS[7] refunds hash   fs:{S}:refunds   rid -> sku, of released holds whose client budgets
--         were charged in other slots (reserve.lua ARGV[11]): budgets.py gives them back there
-- KEYS[8..] reservation hashes fs:{S}:res:RID, all of this one sku
-- ARGV[1] action: confirm | cancel | expire
-- ARGV[2] user id the caller claims ('' for expire)   ARGV[3] payment ref ('' unless confirm)
-- ARGV[4] the changes channel   ARGV[5] the sale id (published there when units come back)
-- ARGV[6..] the reservation ids, in the order of KEYS[8..]
-- confirm/cancel return {'ok'|'err', code, rid, sku, user, qty, status, created_ms, expires_ms,
-- final_ms, payment_ref}; expire returns the number of holds it expired.
local action = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local released = false  -- units went back to stock: processes must forget their "sold out"

local function record(key, rid, r, status)
  redis.call('HSET', key, 'status', status, 'final_ms', now)
  redis.call('ZREM', KEYS[3], rid)
  redis.call('XADD', KEYS[4], '*', 'type', status, 'rid', rid, 'sku', r[2], 'user', r[1],
    'qty', r[3], 'status', status, 'created_ms', r[6], 'expires_ms', r[5], 'idem', r[7] or '',
    'payment_ref', redis.call('HGET', key, 'payment_ref') or '', 'at_ms', now, 'ip', r[8] or '',
    'device', r[9] or '')
end

local function release(key, rid, r, status, counter)
  local qty = tonumber(r[3])
  redis.call('HINCRBY', KEYS[1], 'available', qty)
  redis.call('HINCRBY', KEYS[1], 'held', -qty)
  redis.call('HINCRBY', KEYS[1], counter, qty)
  redis.call('HINCRBY', KEYS[2], r[1], -qty)
  if r[10] == '1' then
    redis.call('HSET', KEYS[7], rid, r[2])
  else
    if r[8] and r[8] ~= '' then redis.call('HINCRBY', KEYS[5], r[8], -qty) end
    if r[9] and r[9] ~= '' then redis.call('HINCRBY', KEYS[6], r[9], -qty) end
  end
  record(key, rid, r, status)
  released = true
end

local function fields(key)
  return redis.call('HMGET', key, 'user', 'sku', 'qty', 'status', 'expires_ms', 'created_ms', 'idem',
    'ip', 'device', 'charged')
end

if action == 'expire' then
  local n = 0
  for i = 8, #KEYS do
    local r = fields(KEYS[i])
    if r[4] == 'held' and tonumber(r[5]) <= now then
      release(KEYS[i], ARGV[i - 2], r, 'expired', 'expired')
      n = n + 1
    elseif r[4] ~= 'held' then
      redis.call('ZREM', KEYS[3], ARGV[i - 2])  -- settled already: only its index entry was left
    end
  end
  if released then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
  return n
end

local key, rid = KEYS[8], ARGV[6]
local r = fields(key)
if not r[1] or r[1] ~= ARGV[2] then return {'err', 'not_found'} end
local code = 'ok'
if r[4] == 'held' and tonumber(r[5]) <= now then
  release(key, rid, r, 'expired', 'expired')
  if action == 'confirm' then code = 'hold_expired' end
elseif r[4] == 'held' and action == 'confirm' then
  local qty = tonumber(r[3])
  redis.call('HINCRBY', KEYS[1], 'held', -qty)
  redis.call('HINCRBY', KEYS[1], 'confirmed', qty)
  redis.call('HSET', key, 'payment_ref', ARGV[3])
  record(key, rid, r, 'confirmed')
elseif r[4] == 'held' then
  release(key, rid, r, 'released', 'cancelled')
elseif action == 'confirm' and r[4] == 'expired' then
  code = 'hold_expired'
elseif (action == 'confirm' and r[4] ~= 'confirmed') or (action == 'cancel' and r[4] == 'confirmed') then
  code = 'invalid_state'
end
if released then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
local out = redis.call('HMGET', key, 'rid', 'sku', 'user', 'qty', 'status', 'created_ms',
  'expires_ms', 'final_ms', 'payment_ref')
return {code == 'ok' and 'ok' or 'err', code, out[1], out[2], out[3], out[4], out[5], out[6],
  out[7], out[8] or '', out[9] or ''}
