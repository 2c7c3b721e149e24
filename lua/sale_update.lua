-- sale_update: change the window, name, hold length or items of a sale that has not started.
-- The fields given are merged into the sale document here, so a restock or another update that
-- lands at the same time is never lost; the new window is checked against the merged values.
-- Items, when given, replace the list: a kept sku gets its new stock and limit (its counters
-- stay), a new sku gets a fresh item hash, a dropped sku's item, user-units and holds keys are
-- deleted. The caller names the dropped keys from the skus it read: if the sale's skus changed
-- since, nothing is written and the caller reads again.
-- KEYS[1] sale hash      fs:{S}:sale
-- KEYS[2] event stream   fs:{S}:events
-- KEYS[3..2+N] one item hash per sku of the new item list, in the order of the skus in ARGV
-- KEYS[3+N..] per sku dropped from the sale, five keys: item hash, user units hash, holds zset,
--           client ip units hash, client device units hash
-- ARGV[1] sale id   ARGV[2] the skus field the caller read ('' when items are not changed)
-- ARGV[3] the changes: a JSON object of the sale document's fields to replace
-- ARGV[4] starts_ms   ARGV[5] ends_ms   ARGV[6] hold_ms   (each '' when not changed)
-- ARGV[7] N, the number of items (0: items not changed)
-- ARGV[8..7+5N] per item, five values: sku, stock, per_user_limit, per_ip_limit, per_device_limit
-- ARGV[8+5N] the changes channel: the sale id is published there (window or stock changed)
-- Returns {'ok', rev} or {'err', code, detail}: not_found; invalid_state with detail 'started',
-- 'ended', or 'taken' (an item's stock below its units held or confirmed); invalid_request with
-- detail 'window' (ends_ms not after starts_ms); conflict (the skus changed since the caller read).
local sale = redis.call('HMGET', KEYS[1], 'state', 'starts_ms', 'ends_ms', 'doc', 'skus',
  'changed_ms', 'created_ms')
if not sale[1] then return {'err', 'not_found', ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if sale[1] == 'ended' or now >= tonumber(sale[3]) then return {'err', 'invalid_state', 'ended'} end
if now >= tonumber(sale[2]) then return {'err', 'invalid_state', 'started'} end

local n = tonumber(ARGV[7])
if n > 0 and sale[5] ~= ARGV[2] then return {'err', 'conflict', ''} end
local starts = ARGV[4] ~= '' and ARGV[4] or sale[2]
local ends = ARGV[5] ~= '' and ARGV[5] or sale[3]
if tonumber(ends) <= tonumber(starts) then return {'err', 'invalid_request', 'window'} end

-- Check every kept item before writing any: units already taken can never exceed the new stock.
local taken = {}
for i = 1, n do
  local cur = redis.call('HMGET', KEYS[2 + i], 'held', 'confirmed')
  if cur[1] then
    taken[i] = tonumber(cur[1]) + tonumber(cur[2])
    if taken[i] > tonumber(ARGV[4 + 5 * i]) then return {'err', 'invalid_state', 'taken'} end
  end
end

local skus = {}
for i = 1, n do
  local sku, stock, limit = ARGV[3 + 5 * i], tonumber(ARGV[4 + 5 * i]), ARGV[5 + 5 * i]
  local ip_limit, device_limit = ARGV[6 + 5 * i], ARGV[7 + 5 * i]
  if taken[i] then
    redis.call('HSET', KEYS[2 + i], 'stock_total', stock, 'available', stock - taken[i],
      'per_user_limit', limit, 'per_ip_limit', ip_limit, 'per_device_limit', device_limit)
  else
    redis.call('HSET', KEYS[2 + i], 'stock_total', stock, 'available', stock, 'held', 0,
      'confirmed', 0, 'cancelled', 0, 'expired', 0, 'reservations', 0, 'attempts', 0,
      'per_user_limit', limit, 'per_ip_limit', ip_limit, 'per_device_limit', device_limit)
  end
  skus[#skus + 1] = sku
end
for i = 3 + n, #KEYS do
  redis.call('DEL', KEYS[i])
end
if n > 0 then redis.call('HSET', KEYS[1], 'skus', table.concat(skus, ',')) end

local doc = cjson.decode(sale[4])
for field, value in pairs(cjson.decode(ARGV[3])) do
  doc[field] = value
end
local encoded = cjson.encode(doc)
-- Never behind the previous change, even if the clock stepped back: Postgres keeps the newest.
local at = math.max(now, tonumber(sale[6] or sale[7] or 0))
redis.call('HSET', KEYS[1], 'starts_ms', starts, 'ends_ms', ends, 'doc', encoded, 'changed_ms', at)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'hold_ms', ARGV[6]) end
local rev = redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('XADD', KEYS[2], '*', 'type', 'sale', 'sale', ARGV[1], 'state', sale[1],
  'doc', encoded, 'at_ms', at)
redis.call('PUBLISH', ARGV[8 + 5 * n], ARGV[1])
return {'ok', rev}
