-- tally_add: refusals answered from memory, added to their items' counters all at once (a lost
-- connection adds all of them or none). A script rather than a MULTI: redis-py's cluster client
-- runs each command queued in a MULTI in a thread on an event loop of its own, which breaks the
-- client for good once it has to refresh its slots (after a failover).
-- KEYS[i]       item hash fs:{S}:item:SKU of the i-th count (an item may come more than once)
-- ARGV[2i-1]    the i-th count's refusal code (the field is rej:CODE)
-- ARGV[2i]      how many
-- Returns how many increments were left out because their counter is not a number (retrying
-- cannot help). Every counter is checked before the first write, so an error at a write (out of
-- memory) fails the whole call with nothing written, and the caller keeps the counts for later.
local refused, good = 0, {}
for i, key in ipairs(KEYS) do
  local fine = true
  for _, field in ipairs({'attempts', 'rej:' .. ARGV[2 * i - 1]}) do
    local v = redis.call('HGET', key, field)
    if v and not string.match(v, '^%-?%d+$') then fine = false end
  end
  if fine then good[#good + 1] = i else refused = refused + 2 end
end
for _, i in ipairs(good) do
  redis.call('HINCRBY', KEYS[i], 'attempts', ARGV[2 * i])
  redis.call('HINCRBY', KEYS[i], 'rej:' .. ARGV[2 * i - 1], ARGV[2 * i])
end
return refused
