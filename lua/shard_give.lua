-- shard_give: the first half of moving stock between two shards of an item: this shard gives up
-- to ARGV[4] available units. They stay counted here as in_flight (so available + held +
-- confirmed + in_flight == stock_total still holds) until shard_done.lua, and the move is
-- written down so that a crash before the taking shard got them only delays them.
-- KEYS[1] item hash   fs:{S~x}:item:SKU
-- KEYS[2] moves hash  fs:{S~x}:moves
-- ARGV[1] move id   ARGV[2] sku   ARGV[3] the slot that takes them   ARGV[4] units wanted
-- Returns the units given (0 if none are available).
local available = tonumber(redis.call('HGET', KEYS[1], 'available') or '0')
local n = math.min(available, tonumber(ARGV[4]))
if n <= 0 then return 0 end
local t = redis.call('TIME')
redis.call('HINCRBY', KEYS[1], 'available', -n)
redis.call('HINCRBY', KEYS[1], 'in_flight', n)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. n .. '|' .. t[1] .. '000')
return n
