-- wrk script: one order per request, each from a new buyer, against API v1.
--   wrk -t2 -c64 -d10s -s bench/wrk-orders.lua http://127.0.0.1:PORT -- SKU
-- Every answer other than 201 (sold out, throttled, overloaded) is counted by wrk
-- as "Non-2xx or 3xx responses", so stock the SKU with more cards than wrk sends.
local threads = {}

function setup(thread)
    thread:set("thread_id", #threads)
    table.insert(threads, thread)
end

function init(args)
    sku = args[1] or "wrk-0"
    counter = 0
    path = "/v1/skus/" .. sku .. "/orders"
    headers = { ["Content-Type"] = "application/json" }
end

function request()
    counter = counter + 1
    local body = '{"user_id":"w' .. thread_id .. '-' .. counter .. '"}'
    return wrk.format("POST", path, headers, body)
end
