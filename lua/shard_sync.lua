-- shard_sync: bring an extra slot's copy of the sale's state and window up to the sale's, after
-- every ops change (pause, resume, end, an update of the window) and whenever the sweeper finds
-- it behind. Copies only a newer revision, so two syncs racing each other never go back.
-- KEYS[1] the slot's sale hash   fs:{S~x}:sale
-- ARGV[1] rev   ARGV[2] state   ARGV[3] starts_ms   ARGV[4] ends_ms   ARGV[5] hold_ms
-- ARGV[6] the changes channel   ARGV[7] the sale id (published there when the copy changed: a
--         process may have remembered a refusal this slot gave from its older copy)
-- Returns 1 if the copy changed, 0 if it was as new already, -1 if the slot has no copy.
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return -1 end
if tonumber(rev) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'state', ARGV[2], 'starts_ms', ARGV[3],
  'ends_ms', ARGV[4], 'hold_ms', ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
