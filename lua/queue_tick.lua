-- queue_tick: one admission tick of a sale's waiting room (one process at a time, under a lock,
-- as the sweeper). Expires the tickets not polled for abandon_ms, then admits up to ARGV[1] of
-- the waiting ones in queue order, unless admission is paused; or closes the queue for good.
-- The caller read the candidates (ZRANGEBYSCORE of the polls, ZRANGE of the queue) just before:
-- each is checked again here, so one that changed in between is left as it is.
-- KEYS[1] queue state   fs:{S}:queue:state
-- KEYS[2] queue zset    fs:{S}:queue
-- KEYS[3] polls zset    fs:{S}:queue:polls
-- KEYS[4..] the ticket hashes of the candidates, in the order of ARGV[6..]
-- ARGV[1] admissions allowed this tick   ARGV[2] what is left of the allowance for the next one
-- ARGV[3] close reason ('' to stay open; 'sold_out': nothing left or held; 'sale_ended')
-- ARGV[4] '1' to pause admission (every unit is held), else '0'
-- ARGV[5] E, the number of expiry candidates   ARGV[6..5+E] expiry candidates, then admission
--         candidates, in queue order
-- Returns {admitted, expired, closed reason or ''}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local closed = redis.call('HGET', KEYS[1], 'closed')
if closed then return {0, 0, closed} end
if ARGV[3] ~= '' then
  -- Closed: the tickets still waiting learn it when they next poll (queue_poll.lua), all at once.
  redis.call('HSET', KEYS[1], 'closed', ARGV[3], 'closed_ms', now)
  redis.call('UNLINK', KEYS[2], KEYS[3])
  return {0, 0, ARGV[3]}
end
local abandon = tonumber(redis.call('HGET', KEYS[1], 'abandon_ms'))

local function leave(i, status, field)
  local ticket = ARGV[5 + i]
  redis.call('HSET', KEYS[3 + i], 'status', status, field, now)
  redis.call('ZREM', KEYS[2], ticket)
  redis.call('ZREM', KEYS[3], ticket)
end

local function stale(i)
  local last = redis.call('ZSCORE', KEYS[3], ARGV[5 + i])
  return last and now - tonumber(last) > abandon
end

local e = tonumber(ARGV[5])
local expired, admitted = 0, 0
for i = 1, e do
  if redis.call('HGET', KEYS[3 + i], 'status') == 'waiting' and stale(i) then
    leave(i, 'expired', 'expired_ms')
    expired = expired + 1
  end
end
if ARGV[4] ~= '1' then
  local allowed = tonumber(ARGV[1])
  for i = e + 1, #ARGV - 5 do
    if admitted >= allowed then break end
    if redis.call('HGET', KEYS[3 + i], 'status') == 'waiting' then
      if stale(i) then
        leave(i, 'expired', 'expired_ms')
        expired = expired + 1
      else
        leave(i, 'admitted', 'admitted_ms')
        admitted = admitted + 1
        -- The highest place admitted: admission goes in place order, so every ticket at or
        -- below it is no longer waiting (a process may answer the others' polls from memory).
        local place = tonumber(redis.call('HGET', KEYS[3 + i], 'place'))
        if place > tonumber(redis.call('HGET', KEYS[1], 'admitted_place') or '-1') then
          redis.call('HSET', KEYS[1], 'admitted_place', place)
        end
      end
    end
  end
end
redis.call('HINCRBY', KEYS[1], 'admitted', admitted)
redis.call('HINCRBY', KEYS[1], 'expired', expired)
redis.call('HSET', KEYS[1], 'tick_ms', now, 'carry', ARGV[2])
return {admitted, expired, ''}
