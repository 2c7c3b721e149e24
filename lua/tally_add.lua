-- tally_add: refusals answered from memory, added to their items' counters all at once (a lost
-- connection adds all of them or none). A script rather than a MULTI: redis-py's cluster client
-- runs each command queued in a MULTI in a thread on an event loop of its own, which breaks the
-- client for good once it has to refresh its slots (after a failover).
-- KEYS[i]       item hash fs:{S}:item:SKU of the i-th count (an item may come more than once)
-- ARGV[2i-1]    the i-th count's refusal code (the field is rej:CODE)
-- ARGV[2i]      how many
-- Returns how many increments Redis refused (a counter that is not a number): retrying cannot help
local refused = 0
for i, key in ipairs(KEYS) do
  local n = ARGV[2 * i]
  for _, field in ipairs({'attempts', 'rej:' .. ARGV[2 * i - 1]}) do
    local r = redis.pcall('HINCRBY', key, field, n)
    if type(r) == 'table' and r.err then refused = refused + 1 end
  end
end
return refused
