-- restock: add units to an item, atomically with reservations in flight. stock_total and
-- available grow in one step, so available + held + confirmed == stock_total at every instant.
-- The item's stock in the sale document grows by as much, so that the sale event carries it to
-- Postgres (items.stock_total). A sharded item is restocked in its first shard (the sale's own
-- slot), and its other shards take from there as they need. Refused once the sale has ended.
-- KEYS[1] sale hash      fs:{S}:sale
-- KEYS[2] item hash      fs:{S}:item:SKU
-- KEYS[3] event stream   fs:{S}:events
-- ARGV[1] sale id   ARGV[2] sku   ARGV[3] quantity (>= 1)
-- ARGV[4] the largest stock_total the sale document may hold
-- ARGV[5] the changes channel: the sale id is published there (units came back)
-- Returns {'ok', the item's stock} or {'err', code, detail}
--   (code: not_found with detail 'sale' or 'item', invalid_state, invalid_request).
local sale = redis.call('HMGET', KEYS[1], 'state', 'ends_ms', 'doc', 'changed_ms', 'created_ms')
if not sale[1] then return {'err', 'not_found', 'sale'} end
local total = redis.call('HGET', KEYS[2], 'stock_total')
local doc = cjson.decode(sale[3])
local entry = nil
for _, item in ipairs(doc.items) do
  if item.sku == ARGV[2] then entry = item end
end
if not total or not entry then return {'err', 'not_found', 'item'} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if sale[1] == 'ended' or now >= tonumber(sale[2]) then return {'err', 'invalid_state', ''} end
local qty = tonumber(ARGV[3])
if tonumber(entry.stock) + qty > tonumber(ARGV[4]) then return {'err', 'invalid_request', ARGV[4]} end

redis.call('HINCRBY', KEYS[2], 'stock_total', qty)
redis.call('HINCRBY', KEYS[2], 'available', qty)
entry.stock = tonumber(entry.stock) + qty
total = entry.stock
local encoded = cjson.encode(doc)
-- Never behind the previous change, even if the clock stepped back: Postgres keeps the newest.
local at = math.max(now, tonumber(sale[4] or sale[5] or 0))
redis.call('HSET', KEYS[1], 'doc', encoded, 'changed_ms', at)
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('XADD', KEYS[3], '*', 'type', 'sale', 'sale', ARGV[1], 'state', sale[1],
  'doc', encoded, 'at_ms', at)
redis.call('PUBLISH', ARGV[5], ARGV[1])
return {'ok', total}
