-- shard_done: the end of a move, back at the giving shard once the taking one has the units:
-- they leave its in_flight and its stock_total. Safe to send twice.
-- KEYS[1] item hash   fs:{S~x}:item:SKU
-- KEYS[2] moves hash  fs:{S~x}:moves
-- ARGV[1] move id
-- Returns 1 if the move was finished now, 0 if it was finished before.
local move = redis.call('HGET', KEYS[2], ARGV[1])
if not move then return 0 end
local n = tonumber(string.match(move, '^[^|]*|[^|]*|([0-9]+)|'))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'in_flight', -n)
redis.call('HINCRBY', KEYS[1], 'stock_total', -n)
return 1
