-- queue_stats: a waiting room's counts in one atomic read, so that they agree with each other. A
-- script rather than a MULTI: redis-py's cluster client runs each command queued in a MULTI in a
-- thread on an event loop of its own, which breaks the client for good once it has to refresh its
-- slots (after a failover).
-- KEYS[1]   room hash          fs:{S}:queue:state
-- KEYS[2]   waiting tickets    fs:{S}:queue (zset)
-- ARGV      the room hash fields to read
-- Returns {its fields' values..., the number waiting}
local out = redis.call('HMGET', KEYS[1], unpack(ARGV))
out[#out + 1] = redis.call('ZCARD', KEYS[2])
return out
