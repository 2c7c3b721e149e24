-- budget_restore: a charge put back after Redis lost it (flashsale recover), for a hold of a
-- sharded item whose client is counted in this slot (budgets.py): once per reservation id, so
-- running recover twice, or over a charge that survived, counts nothing twice.
-- KEYS[1] charges hash   fs:{T}:charges:SKU
-- KEYS[2] client ip units   fs:{T}:ips:SKU     KEYS[3] client device units   fs:{T}:devices:SKU
-- ARGV[1] rid   ARGV[2] quantity   ARGV[3] ip key counted here ('')   ARGV[4] device counted here ('')
-- Returns 1 if the charge was put back, 0 if it was there.
local qty = tonumber(ARGV[2])
local charge = cjson.encode({qty = qty, ip = ARGV[3], device = ARGV[4]})
if redis.call('HSETNX', KEYS[1], ARGV[1], charge) == 0 then return 0 end
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[3], qty) end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[4], qty) end
return 1
