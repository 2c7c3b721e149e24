-- queue_control: ops change a sale's waiting room live: its admissions a second, or close it.
-- A new rate is written to the room and into the sale document (the sale event carries it to
-- Postgres); a close is final, and every ticket still waiting is told so at its next poll.
-- KEYS[1] sale hash      fs:{S}:sale
-- KEYS[2] queue state    fs:{S}:queue:state
-- KEYS[3] event stream   fs:{S}:events
-- KEYS[4] queue zset     fs:{S}:queue
-- KEYS[5] polls zset     fs:{S}:queue:polls
-- ARGV[1] sale id   ARGV[2] action: rate | close   ARGV[3] admissions a second (rate)
-- Returns {'ok'} or {'err', code}  (not_found: no sale or no waiting room; invalid_state: closed).
local sale = redis.call('HMGET', KEYS[1], 'state', 'doc', 'changed_ms', 'created_ms')
if not sale[1] or redis.call('EXISTS', KEYS[2]) == 0 then return {'err', 'not_found'} end
if redis.call('HEXISTS', KEYS[2], 'closed') == 1 then return {'err', 'invalid_state'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == 'close' then
  redis.call('HSET', KEYS[2], 'closed', 'closed_by_ops', 'closed_ms', now)
  redis.call('UNLINK', KEYS[4], KEYS[5])
  return {'ok'}
end
redis.call('HSET', KEYS[2], 'admit_per_s', ARGV[3])
local doc = cjson.decode(sale[2])
doc.waiting_room.admit_per_s = tonumber(ARGV[3])
local encoded = cjson.encode(doc)
-- Never behind the previous change, even if the clock stepped back: Postgres keeps the newest.
local at = math.max(now, tonumber(sale[3] or sale[4] or 0))
redis.call('HSET', KEYS[1], 'doc', encoded, 'changed_ms', at)
redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('XADD', KEYS[3], '*', 'type', 'sale', 'sale', ARGV[1], 'state', sale[1], 'doc', encoded, 'at_ms', at)
return {'ok'}
