-- sale_control: pause, resume or end a sale, atomically with reservations in flight
-- (reserve.lua reads the state in its own atomic step, so no hold slips past a pause or end).
-- Ended is final: pausing or resuming a sale that has ended (by ops or by its window) is
-- refused. Asking for the state a sale is already in changes nothing and is not an error.
-- KEYS[1] sale hash      fs:{S}:sale
-- KEYS[2] event stream   fs:{S}:events
-- ARGV[1] sale id   ARGV[2] action: pause | resume | end
-- ARGV[3] the changes channel: the sale id is published there when the state changed
-- Returns {'ok', state} or {'err', code}  (code: not_found, invalid_state, invalid_request).
local target = ({pause = 'paused', resume = 'active', ['end'] = 'ended'})[ARGV[2]]
if not target then return {'err', 'invalid_request'} end
local sale = redis.call('HMGET', KEYS[1], 'state', 'ends_ms', 'doc', 'changed_ms', 'created_ms')
if not sale[1] then return {'err', 'not_found'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if target ~= 'ended' and (sale[1] == 'ended' or now >= tonumber(sale[2])) then
  return {'err', 'invalid_state'}
end
if sale[1] == target then return {'ok', target} end

-- Never behind the previous change, even if the clock stepped back: Postgres keeps the newest.
local at = math.max(now, tonumber(sale[4] or sale[5] or 0))
redis.call('HSET', KEYS[1], 'state', target, 'changed_ms', at)
redis.call('HINCRBY', KEYS[1], 'rev', 1)  -- extra slots copy the state by rev (shard_sync.lua)
redis.call('XADD', KEYS[2], '*', 'type', 'sale', 'sale', ARGV[1], 'state', target,
  'doc', sale[3], 'at_ms', at)
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {'ok', target}
