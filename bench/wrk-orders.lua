-- wrk script: one order per request, each from a new buyer, against API v1.
--   wrk -t2 -c64 -d10s -s bench/wrk-orders.lua http://127.0.0.1:PORT -- SKU [PREFIX]
-- Buyer ids are PREFIX<thread>-<n> (PREFIX defaults to "w"): a second run against the
-- same SKU needs a new prefix, or its buyers are already at their purchase limit.
-- Every answer other than 201 (sold out, throttled, overloaded) is counted by wrk
-- as "Non-2xx or 3xx responses", so stock the SKU with more cards than wrk sends.
--
-- wrk shares the machine's cores with the server it measures, so each request is
-- one concatenation onto a head built once, rather than wrk.format's per-request
-- header table walk and string.format calls (about 1.5 µs of wrk's CPU per request
-- here, which the server would otherwise not get).
local threads = {}

function setup(thread)
    thread:set("thread_id", #threads)
    table.insert(threads, thread)
end

function init(args)
    local sku = args[1] or "wrk-0"
    local prefix = args[2] or "w"
    counter = 0
    head = "POST /v1/skus/" .. sku .. "/orders HTTP/1.1\r\n"
        .. "Host: " .. wrk.host .. "\r\n"
        .. "Content-Type: application/json\r\n"
        .. "Content-Length: "
    body_start = '{"user_id":"' .. prefix .. thread_id .. "-"
end

function request()
    counter = counter + 1
    local body = body_start .. counter .. '"}'
    return head .. #body .. "\r\n\r\n" .. body
end
