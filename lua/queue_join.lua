-- queue_join: a user joins a sale's waiting room, or gets back the ticket they have.
-- Before the sale starts a ticket's place is a random number (the caller's: Lua's random is
-- seeded alike in every call), so the order at the start owes nothing to who came first; after
-- it, the next number of a counter above every random one: first come, first admitted.
-- KEYS[1] sale hash     fs:{S}:sale
-- KEYS[2] queue state   fs:{S}:queue:state   (seq, admitted, expired, closed reason, rates)
-- KEYS[3] users         fs:{S}:queue:users   (user -> ticket)
-- KEYS[4] queue zset    fs:{S}:queue         (waiting tickets -> place)
-- KEYS[5] polls zset    fs:{S}:queue:polls   (waiting tickets -> last poll ms)
-- KEYS[6] ticket hash   fs:{S}:ticket:T      (T the new ticket, freshly made by the caller)
-- KEYS[7] the ticket hash of ARGV[4] (a never-used key when the caller read none)
-- ARGV[1] new ticket id   ARGV[2] user   ARGV[3] a random place in [0, 1)
-- ARGV[4] the user's ticket as the caller read it from KEYS[3] ('' for none)
-- Returns {'new'|'same', ticket}, {'retry'} (the user's ticket changed since the caller read it:
-- read again), or {'err', 'not_found'} (no sale, or no waiting room).
local sale = redis.call('HMGET', KEYS[1], 'starts_ms', 'state')
if not sale[1] then return {'err', 'not_found'} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'err', 'not_found'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local held = redis.call('HGET', KEYS[3], ARGV[2])
if (held or '') ~= ARGV[4] then return {'retry'} end
if held then
  local status = redis.call('HGET', KEYS[7], 'status')
  -- A ticket that expired gives its user a new one (at the back); any other is theirs to keep.
  if status and status ~= 'expired' then return {'same', held} end
end
local place
if now < tonumber(sale[1]) then
  place = ARGV[3]
else
  place = 1 + redis.call('HINCRBY', KEYS[2], 'seq', 1)
end
redis.call('HSET', KEYS[6], 'user', ARGV[2], 'status', 'waiting', 'place', place, 'joined_ms', now)
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
local closed = redis.call('HGET', KEYS[2], 'closed')
if closed then
  redis.call('HSET', KEYS[6], 'status', 'closed', 'reason', closed)
  return {'new', ARGV[1]}
end
redis.call('ZADD', KEYS[4], place, ARGV[1])
redis.call('ZADD', KEYS[5], now, ARGV[1])
redis.call('HINCRBY', KEYS[2], 'joined', 1)
return {'new', ARGV[1]}
