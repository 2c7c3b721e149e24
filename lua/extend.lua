-- extend: a live hold's expiry moved later, bounded per reservation, in one atomic step with the
-- due-time index: the sweeper (which re-reads expires_ms inside settle.lua) never releases a hold
-- extended before its sweep, and a hold already due is not brought back.
-- KEYS[1] reservation hash   fs:{S}:res:RID
-- KEYS[2] holds zset         fs:{S}:holds:SKU   (the sweeper's due-time index)
-- KEYS[3] event stream       fs:{S}:events
-- ARGV[1] rid   ARGV[2] the user asking   ARGV[3] seconds to add
-- ARGV[4] max_extensions   ARGV[5] max_extension_seconds (the sale's, in all)
-- Returns {'ok'} or {'err', code}: not_found (no such hold of this user), hold_expired (due or
-- expired), invalid_state (confirmed or released), extension_limit.
local r = redis.call('HMGET', KEYS[1], 'user', 'sku', 'qty', 'status', 'expires_ms', 'created_ms', 'idem',
  'extensions', 'extended_s', 'ip', 'device')
if not r[1] or r[1] ~= ARGV[2] then return {'err', 'not_found'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if r[4] == 'expired' or (r[4] == 'held' and tonumber(r[5]) <= now) then return {'err', 'hold_expired'} end
if r[4] ~= 'held' then return {'err', 'invalid_state'} end
local seconds = tonumber(ARGV[3])
local count, total = tonumber(r[8] or '0') + 1, tonumber(r[9] or '0') + seconds
if count > tonumber(ARGV[4]) or total > tonumber(ARGV[5]) then return {'err', 'extension_limit'} end
local expires = tonumber(r[5]) + seconds * 1000
redis.call('HSET', KEYS[1], 'expires_ms', expires, 'extensions', count, 'extended_s', total)
redis.call('ZADD', KEYS[2], 'XX', expires, ARGV[1])
redis.call('XADD', KEYS[3], '*', 'type', 'extended', 'rid', ARGV[1], 'sku', r[2], 'user', r[1], 'qty', r[3],
  'status', 'held', 'created_ms', r[6], 'expires_ms', expires, 'idem', r[7] or '', 'at_ms', now, 'ip', r[10] or '',
  'device', r[11] or '', 'extensions', count, 'extended_s', total)
return {'ok'}
