-- cart_settle: confirm every line of a cart, or cancel every line, in one atomic step: a cart is
-- paid for whole or not at all, and never partly released.
-- Confirm: every line must be held and not yet due; a line due (the sweeper has not come to it)
-- is expired on the spot, as settle.lua does, and then the whole confirm is refused. Lines
-- confirmed already count as done (a retried confirm is answered ok).
-- Cancel: every held line is released (a due one as expired); a confirmed line refuses the
-- whole cancel (409 invalid_state), as it refuses a reservation's cancel.
-- KEYS[1] cart hash   fs:{S}:cart:CID     KEYS[2] event stream   fs:{S}:events
-- KEYS[3..] per line, 6 each: reservation hash, item hash, user units hash, holds zset,
--           client ip units, client device units
-- ARGV[1] confirm | cancel   ARGV[2] the user asking   ARGV[3] payment ref ('' for cancel)
-- ARGV[4] the changes channel   ARGV[5] the sale id   ARGV[6..] the lines' reservation ids
-- Returns {'ok'} or {'err', code, line (0-based)}: not_found, hold_expired, invalid_state.
local cart = redis.call('HGET', KEYS[1], 'user')
if not cart or cart ~= ARGV[2] then return {'err', 'not_found', 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #ARGV - 5
local function key(i, k) return KEYS[2 + (i - 1) * 6 + k] end
local lines = {}
for i = 1, n do
  lines[i] = redis.call('HMGET', key(i, 1), 'user', 'sku', 'qty', 'status', 'expires_ms', 'created_ms', 'ip',
    'device')
end

local released = false
local function record(i, status)
  local r, rid = lines[i], ARGV[5 + i]
  redis.call('HSET', key(i, 1), 'status', status, 'final_ms', now)
  redis.call('ZREM', key(i, 4), rid)
  redis.call('XADD', KEYS[2], '*', 'type', status, 'rid', rid, 'sku', r[2], 'user', r[1], 'qty', r[3],
    'status', status, 'created_ms', r[6], 'expires_ms', r[5], 'idem', '',
    'payment_ref', redis.call('HGET', key(i, 1), 'payment_ref') or '', 'at_ms', now, 'ip', r[7] or '',
    'device', r[8] or '')
end
local function release(i, status, counter)
  local r, qty = lines[i], tonumber(lines[i][3])
  redis.call('HINCRBY', key(i, 2), 'available', qty)
  redis.call('HINCRBY', key(i, 2), 'held', -qty)
  redis.call('HINCRBY', key(i, 2), counter, qty)
  redis.call('HINCRBY', key(i, 3), r[1], -qty)
  if r[7] and r[7] ~= '' then redis.call('HINCRBY', key(i, 5), r[7], -qty) end
  if r[8] and r[8] ~= '' then redis.call('HINCRBY', key(i, 6), r[8], -qty) end
  record(i, status)
  released = true
end
local function due(i) return lines[i][4] == 'held' and tonumber(lines[i][5]) <= now end
local function finish(answer)
  if released then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
  return answer
end

if ARGV[1] == 'confirm' then
  local refused = nil
  for i = 1, n do
    local status = lines[i][4]
    if due(i) then
      release(i, 'expired', 'expired')
      refused = refused or {'err', 'hold_expired', i - 1}
    elseif status == 'expired' then
      refused = refused or {'err', 'hold_expired', i - 1}
    elseif status ~= 'held' and status ~= 'confirmed' then
      refused = refused or {'err', 'invalid_state', i - 1}
    end
  end
  if refused then return finish(refused) end
  for i = 1, n do
    if lines[i][4] == 'held' then
      local qty = tonumber(lines[i][3])
      redis.call('HINCRBY', key(i, 2), 'held', -qty)
      redis.call('HINCRBY', key(i, 2), 'confirmed', qty)
      redis.call('HSET', key(i, 1), 'payment_ref', ARGV[3])
      record(i, 'confirmed')
    end
  end
  return finish({'ok'})
end

for i = 1, n do
  if lines[i][4] == 'confirmed' then return {'err', 'invalid_state', i - 1} end
end
for i = 1, n do
  if due(i) then
    release(i, 'expired', 'expired')
  elseif lines[i][4] == 'held' then
    release(i, 'released', 'cancelled')
  end
end
return finish({'ok'})
