-- sale_create: load a new sale (window, state, stock, limits) before the API answers 201.
-- KEYS[1] sale hash           fs:{S}:sale
-- KEYS[2] event stream        fs:{S}:events
-- KEYS[3] queue state         fs:{S}:queue:state  (made only for a sale with a waiting room)
-- KEYS[4..] one item hash per sku, in the order of the skus in ARGV
-- ARGV[1] sale id   ARGV[2] starts_ms   ARGV[3] ends_ms   ARGV[4] hold_ms
-- ARGV[5] sale document (JSON, names and prices)   ARGV[6] consumer group names, comma-separated
-- ARGV[7] the state it starts in: 'active' (a new sale) or 'paused' (flashsale recover, which
--         restores the holds before it lets the sale sell)
-- ARGV[8] the sale's extra slots (shards.py), comma-separated ('' for none: no item sharded)
-- ARGV[9] the waiting room's admit_per_s ('' for none)   ARGV[10] its abandon_ms   ARGV[11] ttl_ms
-- ARGV[12] ip_rate_per_s: attempts per client ip per second (0: off)
-- ARGV[13..] per item, five values: sku, stock (a sharded item: its first shard's), per_user_limit,
--         per_ip_limit and per_device_limit (0: none)
-- Returns {'ok'} or {'err', 'already_exists'}: also when only some of its keys are left (a
-- partial loss), which must never be overwritten with fresh counters.
for k = 1, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then return {'err', 'already_exists'} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local skus = {}
for i = 13, #ARGV, 5 do
  local k = 4 + (i - 13) / 5
  local stock = ARGV[i + 1]
  redis.call('HSET', KEYS[k], 'stock_total', stock, 'available', stock, 'held', 0,
    'confirmed', 0, 'cancelled', 0, 'expired', 0, 'reservations', 0, 'attempts', 0,
    'per_user_limit', ARGV[i + 2], 'per_ip_limit', ARGV[i + 3], 'per_device_limit', ARGV[i + 4])
  skus[#skus + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', ARGV[7], 'starts_ms', ARGV[2],
  'ends_ms', ARGV[3], 'hold_ms', ARGV[4], 'doc', ARGV[5], 'skus', table.concat(skus, ','),
  'slots', ARGV[8], 'created_ms', now, 'rev', 1, 'ip_rate', ARGV[12])
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[3], 'admit_per_s', ARGV[9], 'abandon_ms', ARGV[10], 'ttl_ms', ARGV[11],
    'seq', 0, 'joined', 0, 'admitted', 0, 'expired', 0, 'carry', 0)
end
-- The groups start at 0 so that each sees this sale's very first event.
for group in string.gmatch(ARGV[6], '[^,]+') do  -- the persister's and the webhooks'
  redis.call('XGROUP', 'CREATE', KEYS[2], group, '0', 'MKSTREAM')
end
redis.call('XADD', KEYS[2], '*', 'type', 'sale', 'sale', ARGV[1], 'state', ARGV[7],
  'doc', ARGV[5], 'at_ms', now)
return {'ok'}
