-- shard_take: the second half of a move: the shard that asked gets the units, once per move id
-- however often it is sent (the API right after shard_give, the sweeper's repair after a crash).
-- KEYS[1] item hash      fs:{S~y}:item:SKU
-- KEYS[2] received set   fs:{S~y}:received
-- KEYS[3] the slot's sale hash (or copy)   fs:{S~y}:sale
-- ARGV[1] move id   ARGV[2] units
-- Returns 1 if the units were added now, 0 if this move was taken before, -1 if the slot is gone
-- (its master lost it): the move stays pending at the giver, for flashsale recover to account.
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'available', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'stock_total', ARGV[2])
return 1
