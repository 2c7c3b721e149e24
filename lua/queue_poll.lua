-- queue_poll: where a ticket stands. Polling keeps its place (its last poll time is what the
-- admission tick reads to expire abandoned tickets); one not polled for abandon_ms is expired
-- here at once, whether or not the tick has come to it.
-- KEYS[1] ticket hash   fs:{S}:ticket:T
-- KEYS[2] queue zset    fs:{S}:queue
-- KEYS[3] polls zset    fs:{S}:queue:polls
-- KEYS[4] queue state   fs:{S}:queue:state
-- KEYS[5] sale hash     fs:{S}:sale
-- ARGV[1] ticket   ARGV[2] the user asking
-- Returns {'err', 'not_found'} (no such ticket, or another user's), or {status, position
--   (0-based, -1 unless waiting), admitted_ms or '', reason or '', {admit_per_s, abandon_ms,
--   ttl_ms, the sale's starts_ms, now ms, admitted, expired and joined so far, the sale's
--   created_ms (made again by a recover: the room's generation)}, the ticket's place}
local t = redis.call('HMGET', KEYS[1], 'user', 'status', 'admitted_ms', 'reason', 'place')
if not t[1] or t[1] ~= ARGV[2] then return {'err', 'not_found'} end
local state = redis.call('HMGET', KEYS[4], 'admit_per_s', 'abandon_ms', 'closed', 'ttl_ms', 'admitted', 'expired',
  'joined')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local sale = redis.call('HMGET', KEYS[5], 'starts_ms', 'created_ms')
local room = {state[1], state[2], state[4], sale[1], now, state[5] or '0', state[6] or '0', state[7] or '0',
  sale[2] or '0'}
local place = t[5]
local status = t[2]
if status == 'waiting' then
  local last = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or '0')
  if state[3] then
    -- The queue closed: every ticket still waiting is told at once, with the reason.
    redis.call('HSET', KEYS[1], 'status', 'closed', 'reason', state[3])
    redis.call('HINCRBY', KEYS[4], 'closed_told', 1)
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[3], ARGV[1])
    return {'closed', -1, '', state[3], room, place}
  end
  if now - last > tonumber(state[2]) then
    redis.call('HSET', KEYS[1], 'status', 'expired')
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HINCRBY', KEYS[4], 'expired', 1)
    return {'expired', -1, '', '', room, place}
  end
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  return {'waiting', redis.call('ZRANK', KEYS[2], ARGV[1]), '', '', room, place}
end
return {status, -1, t[3] or '', t[4] or '', room, place}
