-- wrk: every request reserves one unit for a user never seen before (distinct user ids and
-- Idempotency-Keys across threads and requests), as a storefront would send it.
--   wrk -s loadtest/wrk/reserve.lua URL -- PATH SKU TOKEN [USER_PREFIX] [nokey]
-- With "nokey" the requests carry no Idempotency-Key.
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  path, sku, token, prefix, nokey = args[1], args[2], args[3], args[4] or "w", args[5] == "nokey"
  n = 0
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}
end

function request()
  n = n + 1
  local user = prefix .. tid .. "-" .. n
  if not nokey then headers["Idempotency-Key"] = user end
  return wrk.format("POST", path, headers, '{"user_id":"' .. user .. '","sku":"' .. sku .. '","quantity":1}')
end
