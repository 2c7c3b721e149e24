-- sale_view: one sale and all its items in one atomic read, for GET /v1/sales/{id}, the request a
-- crowd sends most. The caller names the item keys from the skus it last saw; if the sale's skus
-- changed since (a PATCH before the start), nothing is read and the current skus come back, to
-- ask again with the right keys.
-- KEYS[1]        sale hash                 fs:{S}:sale
-- KEYS[2..1+2N]  per sku, in the order of ARGV[1]: item hash fs:{S}:item:SKU, holds zset fs:{S}:holds:SKU
-- ARGV[1]        the skus field as the caller knows it (comma-separated; '' when it knows none)
-- ARGV[2..]      the item hash fields to read
-- Returns {'missing'}, {'skus', current skus}, or
--   {'ok', now_ms, {state, starts_ms, ends_ms, hold_ms, doc}, per sku: {fields...}, {first hold rid, its expiry ms} or {}}
local sale = redis.call('HMGET', KEYS[1], 'skus', 'state', 'starts_ms', 'ends_ms', 'hold_ms', 'doc')
if not sale[1] then return {'missing'} end
if sale[1] ~= ARGV[1] then return {'skus', sale[1]} end
local t = redis.call('TIME')
local out = {'ok', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
  {sale[2], sale[3], sale[4], sale[5], sale[6]}}
local fields = {unpack(ARGV, 2)}
for i = 2, #KEYS, 2 do
  out[#out + 1] = redis.call('HMGET', KEYS[i], unpack(fields))
  out[#out + 1] = redis.call('ZRANGE', KEYS[i + 1], 0, 0, 'WITHSCORES')
end
return out
