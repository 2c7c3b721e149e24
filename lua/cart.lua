-- cart: every line of a cart held, or none, in one atomic step (one sale is one slot).
-- Each line is an ordinary reservation (its own id and hash, confirm/cancel/expiry as any hold),
-- checked as lua/reserve.lua checks one (window, state, stock, per-user limit, client budgets),
-- every check of every line before the first write: a refusal changes nothing but the counters.
-- Lines of a sharded item are refused before this script (carts.py): their users live in
-- other slots.
-- KEYS[1] sale hash          fs:{S}:sale
-- KEYS[2] event stream       fs:{S}:events
-- KEYS[3] cart hash          fs:{S}:cart:CID   (CID freshly made by the caller)
-- KEYS[4] idempotency key    fs:{S}:idem:...   (a never-used key when the client sent none)
-- KEYS[5] rate counter       fs:{S}:rate:USER
-- KEYS[6] user's holds zset  fs:{S}:mine:USER
-- KEYS[7] ip rate counter    fs:{S}:iprate:IP  (a never-used key when no ip was given)
-- KEYS[8..] per line, 6 each: item hash, user units hash, holds zset, reservation hash (RID
--         fresh), client ip units, client device units
-- ARGV[1] cart id   ARGV[2] user_id   ARGV[3] idempotency key ('' for none)   ARGV[4] fingerprint
-- ARGV[5] max attempts per user per second (0 = off)   ARGV[6] ip key ('')   ARGV[7] device ('')
-- ARGV[8..] per line, 3 each: sku, quantity, rid
-- Returns {'ok', created_ms, expires_ms}, {'replay', cart id}, or {'err', code, line (0-based),
-- number} (number: available units, retry ms or starts_ms, as reserve.lua's).
if redis.call('EXISTS', KEYS[3]) == 1 then return {'replay', ARGV[1]} end
local sale = redis.call('HMGET', KEYS[1], 'state', 'starts_ms', 'ends_ms', 'hold_ms', 'ip_rate')
if not sale[1] then return {'err', 'not_found', 0, 0} end
local user, ip, device = ARGV[2], ARGV[6], ARGV[7]
local n = (#ARGV - 7) / 3
local function key(i, k) return KEYS[7 + (i - 1) * 6 + k] end
local function arg(i, k) return ARGV[7 + (i - 1) * 3 + k] end

local items = {}
for i = 1, n do
  local it = redis.call('HMGET', key(i, 1), 'available', 'per_user_limit', 'per_ip_limit', 'per_device_limit')
  if not it[2] then return {'err', 'not_found', i - 1, 0} end
  items[i] = it
  redis.call('HINCRBY', key(i, 1), 'attempts', 1)  -- each line is an attempt at its item
end
local function reject(i, code, number)
  redis.call('HINCRBY', key(i, 1), 'rej:' .. code, 1)
  return {'err', code, i - 1, number}
end

if ARGV[3] ~= '' then
  local prior = redis.call('GET', KEYS[4])
  if prior then
    local sep = string.find(prior, '|', 1, true)
    if string.sub(prior, sep + 1) ~= ARGV[4] then return reject(1, 'idempotency_conflict', 0) end
    return {'replay', string.sub(prior, 1, sep - 1)}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local starts, ends = tonumber(sale[2]), tonumber(sale[3])
if sale[1] == 'ended' or now >= ends then return reject(1, 'sale_ended', 0) end
if now < starts then return reject(1, 'sale_not_started', starts) end
if sale[1] == 'paused' then return reject(1, 'sale_paused', 0) end
for i = 1, n do
  local qty = tonumber(arg(i, 2))
  if qty > tonumber(items[i][1]) then return reject(i, 'sold_out', tonumber(items[i][1])) end
end
local max_rate = tonumber(ARGV[5])
if max_rate > 0 then
  local c = redis.call('INCR', KEYS[5])
  if c == 1 then redis.call('PEXPIRE', KEYS[5], 1000) end
  if c > max_rate then return reject(1, 'rate_limited', redis.call('PTTL', KEYS[5])) end
end
local ip_rate = tonumber(sale[5] or '0')
if ip ~= '' and ip_rate > 0 then
  local c = redis.call('INCR', KEYS[7])
  if c == 1 then redis.call('PEXPIRE', KEYS[7], 1000) end
  if c > ip_rate then return reject(1, 'rate_limited', redis.call('PTTL', KEYS[7])) end
end
for i = 1, n do
  local qty, limits = tonumber(arg(i, 2)), items[i]
  local mine = tonumber(redis.call('HGET', key(i, 2), user) or '0')
  if mine + qty > tonumber(limits[2]) then return reject(i, 'limit_exceeded', tonumber(limits[2]) - mine) end
  for k, who in pairs({[5] = ip, [6] = device}) do
    local cap = tonumber(limits[k - 2] or '0')
    if who ~= '' and cap > 0 then
      local used = tonumber(redis.call('HGET', key(i, k), who) or '0')
      if used + qty > cap then return reject(i, 'limit_exceeded', cap - used) end
    end
  end
end

local expires = now + tonumber(sale[4])
local rids = {}
for i = 1, n do
  local sku, qty, rid = arg(i, 1), tonumber(arg(i, 2)), arg(i, 3)
  redis.call('HINCRBY', key(i, 1), 'available', -qty)
  redis.call('HINCRBY', key(i, 1), 'held', qty)
  redis.call('HINCRBY', key(i, 1), 'reservations', 1)
  redis.call('HINCRBY', key(i, 2), user, qty)
  if ip ~= '' then redis.call('HINCRBY', key(i, 5), ip, qty) end
  if device ~= '' then redis.call('HINCRBY', key(i, 6), device, qty) end
  redis.call('HSET', key(i, 4), 'rid', rid, 'sku', sku, 'user', user, 'qty', qty, 'status', 'held',
    'created_ms', now, 'expires_ms', expires, 'idem', '', 'ip', ip, 'device', device, 'charged', '',
    'cart', ARGV[1])
  redis.call('ZADD', key(i, 3), expires, rid)
  redis.call('ZADD', KEYS[6], now, rid)
  redis.call('XADD', KEYS[2], '*', 'type', 'reserve', 'rid', rid, 'sku', sku, 'user', user, 'qty', qty,
    'status', 'held', 'created_ms', now, 'expires_ms', expires, 'idem', '', 'at_ms', now, 'ip', ip,
    'device', device)
  rids[i] = rid
end
redis.call('HSET', KEYS[3], 'user', user, 'rids', table.concat(rids, ','), 'created_ms', now,
  'expires_ms', expires)
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[1] .. '|' .. ARGV[4]) end
return {'ok', tostring(now), tostring(expires)}
