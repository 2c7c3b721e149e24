-- shard_create: one extra slot of a sale with sharded items (shards.py), made before the sale's
-- own keys (sale_create.lua) so that no reservation is ever routed to a slot that is not there.
-- It holds a copy of the sale's state and window, the shares of the items sharded into it, and an
-- event stream of its own (read by the persister like the sale's).
-- KEYS[1] the slot's sale hash   fs:{S~x}:sale
-- KEYS[2] the slot's events      fs:{S~x}:events
-- KEYS[3..] one item hash per sku, in the order of the skus in ARGV
-- ARGV[1] sale id   ARGV[2] starts_ms   ARGV[3] ends_ms   ARGV[4] hold_ms   ARGV[5] state
-- ARGV[6] consumer group names, comma-separated   ARGV[7] the sale document, as sale_create.lua will get it
-- ARGV[8] ip_rate_per_s (0: off)
-- ARGV[9..] per item, five values: sku, this shard's stock, per_user_limit, per_ip_limit,
--         per_device_limit (0: none)
-- Returns {'ok'} (also when an earlier try of the same create made it: its document matches)
--      or {'err', 'already_exists'}.
local doc = redis.call('HGET', KEYS[1], 'doc')
if doc then
  if doc == ARGV[7] then return {'ok'} end
  return {'err', 'already_exists'}
end
for k = 2, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then return {'err', 'already_exists'} end
end
local skus = {}
for i = 9, #ARGV, 5 do
  local stock = ARGV[i + 1]
  redis.call('HSET', KEYS[3 + (i - 9) / 5], 'stock_total', stock, 'available', stock, 'held', 0,
    'confirmed', 0, 'cancelled', 0, 'expired', 0, 'reservations', 0, 'attempts', 0,
    'in_flight', 0, 'per_user_limit', ARGV[i + 2], 'per_ip_limit', ARGV[i + 3],
    'per_device_limit', ARGV[i + 4])
  skus[#skus + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', ARGV[5], 'starts_ms', ARGV[2],
  'ends_ms', ARGV[3], 'hold_ms', ARGV[4], 'skus', table.concat(skus, ','), 'rev', 1, 'doc', ARGV[7],
  'ip_rate', ARGV[8])
for group in string.gmatch(ARGV[6], '[^,]+') do  -- the persister's and the webhooks'
  redis.call('XGROUP', 'CREATE', KEYS[2], group, '0', 'MKSTREAM')
end
return {'ok'}
