-- recover_hold: one reservation as Postgres has it, put back into Redis (flashsale recover), after
-- Redis lost it (a restart without AOF, a failover that dropped acknowledged writes). The item's
-- counters move as reserve.lua and settle.lua would have moved them, so conservation holds, and
-- each call is atomic: it can run while the sale takes traffic.
-- KEYS[1] item hash         fs:{S}:item:SKU
-- KEYS[2] user units hash   fs:{S}:users:SKU
-- KEYS[3] holds zset        fs:{S}:holds:SKU
-- KEYS[4] reservation hash  fs:{S}:res:RID
-- KEYS[5] idempotency key   fs:{S}:idem:...  (a never-used key when the reservation had none)
-- KEYS[6] user's holds zset fs:{S}:mine:USER
-- KEYS[7] client ip units    fs:{S}:ips:SKU     KEYS[8] client device units   fs:{S}:devices:SKU
-- KEYS[9] refunds hash       fs:{S}:refunds     (a charged hold's release: budgets.py gives it back)
-- ARGV[1] rid   ARGV[2] sku   ARGV[3] user   ARGV[4] qty   ARGV[5] status in Postgres
-- ARGV[6] created_ms   ARGV[7] expires_ms   ARGV[8] final_ms ('' while held)   ARGV[9] payment_ref
-- ARGV[10] idempotency key ('' for none)   ARGV[11] its value, "rid|sku:qty"
-- ARGV[12] the changes channel   ARGV[13] the sale id (published there when units come back)
-- ARGV[14] the client's ip key ('')   ARGV[15] the client's device ('')
-- ARGV[16] '1' when the client is counted in other slots (a sharded item: budgets.py), else ''
-- ARGV[17] times its hold was extended   ARGV[18] seconds it was extended by in all
-- Returns {outcome, status in Redis after}: outcome 'added' (Redis had none of it), 'settled'
-- (Redis had it held, Postgres has its final status), 'extended' (both have it held, Postgres
-- with a later expiry: an extension Redis lost), or 'kept' (Redis knows as much or more).
local qty = tonumber(ARGV[4])
local status = ARGV[5]
local current = redis.call('HGET', KEYS[4], 'status')
local ip, device, charged = ARGV[14], ARGV[15], ARGV[16]

local function count(r_ip, r_device, n)  -- the client's units, where this slot counts them
  if r_ip and r_ip ~= '' then redis.call('HINCRBY', KEYS[7], r_ip, n) end
  if r_device and r_device ~= '' then redis.call('HINCRBY', KEYS[8], r_device, n) end
end

local function finish()
  if ARGV[8] ~= '' then redis.call('HSET', KEYS[4], 'final_ms', ARGV[8]) end
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[4], 'payment_ref', ARGV[9]) end
end

if not current then
  redis.call('HSET', KEYS[4], 'rid', ARGV[1], 'sku', ARGV[2], 'user', ARGV[3], 'qty', qty,
    'status', status, 'created_ms', ARGV[6], 'expires_ms', ARGV[7], 'idem', ARGV[10], 'ip', ip,
    'device', device, 'charged', charged, 'extensions', ARGV[17], 'extended_s', ARGV[18])
  finish()
  redis.call('HINCRBY', KEYS[1], 'reservations', 1)
  if status == 'held' or status == 'confirmed' then
    redis.call('HINCRBY', KEYS[1], 'available', -qty)
    redis.call('HINCRBY', KEYS[1], status, qty)
    redis.call('HINCRBY', KEYS[2], ARGV[3], qty)
    if charged ~= '1' then count(ip, device, qty) end
    if status == 'held' then redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1]) end
  else  -- released or expired: its units went back to stock long ago
    redis.call('HINCRBY', KEYS[1], status == 'released' and 'cancelled' or 'expired', qty)
  end
  if ARGV[10] ~= '' then redis.call('SET', KEYS[5], ARGV[11], 'NX') end
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[1])
  return {'added', status}
end

if current == 'held' and status ~= 'held' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'held', -qty)
  if status == 'confirmed' then
    redis.call('HINCRBY', KEYS[1], 'confirmed', qty)
  else
    redis.call('HINCRBY', KEYS[1], 'available', qty)
    redis.call('HINCRBY', KEYS[1], status == 'released' and 'cancelled' or 'expired', qty)
    redis.call('HINCRBY', KEYS[2], ARGV[3], -qty)
    local r = redis.call('HMGET', KEYS[4], 'ip', 'device', 'charged')
    if r[3] == '1' then redis.call('HSET', KEYS[9], ARGV[1], ARGV[2]) else count(r[1], r[2], -qty) end
    redis.call('PUBLISH', ARGV[12], ARGV[13])
  end
  redis.call('HSET', KEYS[4], 'status', status)
  finish()
  return {'settled', status}
end
if current == 'held' and status == 'held' and tonumber(ARGV[7]) > tonumber(redis.call('HGET', KEYS[4], 'expires_ms')) then
  -- The client was told the later expiry (and the extension counts against the sale's limits).
  redis.call('HSET', KEYS[4], 'expires_ms', ARGV[7], 'extensions', ARGV[17], 'extended_s', ARGV[18])
  redis.call('ZADD', KEYS[3], 'XX', ARGV[7], ARGV[1])
  return {'extended', current}
end
return {'kept', current}
