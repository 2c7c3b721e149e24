-- budget_give: give back the client budget charges of reservations that did not hold or hold no
-- more (refused, cancelled, expired), each once however often it is asked (lua/budget_take.lua).
-- KEYS[1] charges hash   fs:{T}:charges:SKU     KEYS[2] pending zset   fs:{T}:pending:SKU
-- KEYS[3] client ip units   fs:{T}:ips:SKU      KEYS[4] client device units   fs:{T}:devices:SKU
-- ARGV[1..] reservation ids
-- Returns how many charges were given back.
local n = 0
for _, rid in ipairs(ARGV) do
  local raw = redis.call('HGET', KEYS[1], rid)
  if raw then
    local c = cjson.decode(raw)
    if c.ip ~= '' then redis.call('HINCRBY', KEYS[3], c.ip, -c.qty) end
    if c.device ~= '' then redis.call('HINCRBY', KEYS[4], c.device, -c.qty) end
    redis.call('HDEL', KEYS[1], rid)
    n = n + 1
  end
  redis.call('ZREM', KEYS[2], rid)
end
return n
