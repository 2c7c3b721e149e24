-- retire: take a sale out of the active set, unless it was made active again since it was read.
-- The persister calls it once the sale's time is over and it has no hold and no unpersisted
-- event; an ops action raises the score before it appends its event, so a changed score means
-- "not done yet". One global key: no cross-slot access.
-- KEYS[1] active zset   fs:active
-- ARGV[1] sale id   ARGV[2] the score the caller read
-- Returns 1 if retired, 0 if the score had changed.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
