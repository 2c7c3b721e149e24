-- progress_read: a sale and every item's counters in one atomic read, for /progress and the
-- dashboard, so that the numbers agree with each other. A script rather than a MULTI: redis-py's
-- cluster client runs each command queued in a MULTI in a thread on an event loop of its own,
-- which breaks the client for good once it has to refresh its slots (after a failover).
-- KEYS[1]     sale hash     fs:{S}:sale
-- KEYS[2..]   item hashes   fs:{S}:item:SKU, in the order of the document the caller read
-- ARGV        none
-- Returns {now_ms, {state, starts_ms, ends_ms, doc, audit}, per item: its HGETALL as a flat list}
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
  redis.call('HMGET', KEYS[1], 'state', 'starts_ms', 'ends_ms', 'doc', 'audit')}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
end
return out
