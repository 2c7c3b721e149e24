-- budget_void: settle a charge whose hold was never reported (the API process died between
-- lua/budget_take.lua and lua/reserve.lua): either the hold was made, or it never will be.
-- Run in the slot the reservation id names. A late reserve.lua with this id finds the
-- tombstone (EXISTS) and answers 'replay', which the API turns into 503 unavailable.
-- KEYS[1] reservation hash   fs:{S~x}:res:RID
-- Returns 1 if the hold exists (keep the charge), 0 if it never will (give it back).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HEXISTS', KEYS[1], 'void') == 1 and 0 or 1
end
redis.call('HSET', KEYS[1], 'void', '1')
return 0
