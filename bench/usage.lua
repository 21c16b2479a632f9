-- wrk script: every request is a usage API call (POST /api/v1/usage) with an organization's API key.
--
-- wrk -s bench/usage.lua URL -- BATCH FIRST THREADS KEYS_FILE
--   Thread i of THREADS sends requests FIRST+i, FIRST+i+THREADS, ...; request q uses the key on line
--   q % (number of keys) + 1 of KEYS_FILE and carries BATCH new events ("events": [...] when BATCH > 1,
--   one event object when BATCH = 1), idempotency keys "q<q>-<j>", 10 api_calls each.
-- done() prints one line, "BENCH {json}", as bench/webhook.lua does.

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

local batch, first, stride, keys

function init(args)
  batch, first, stride = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
  keys = {}
  for line in io.lines(args[4]) do
    table.insert(keys, line)
  end
  sent = 0 -- global: done() reads it with thread:get
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  -- As the TLS-terminating proxy forwards it (TRUSTED_PROXY_COUNT=1).
  wrk.headers["X-Forwarded-For"] = "3.18.12.63"
  wrk.headers["X-Forwarded-Proto"] = "https"
end

local function event(q, j)
  return string.format('{"meter": "api_calls", "quantity": 10, "idempotency_key": "q%d-%d"}', q, j)
end

function request()
  local q = first + thread_index + stride * sent
  sent = sent + 1
  wrk.headers["Authorization"] = "Bearer " .. keys[q % #keys + 1]
  local body
  if batch == 1 then
    body = event(q, 0)
  else
    local events = {}
    for j = 0, batch - 1 do
      events[j + 1] = event(q, j)
    end
    body = '{"events": [' .. table.concat(events, ", ") .. "]}"
  end
  return wrk.format(nil, nil, nil, body)
end

-- done(): the "BENCH {json}" line bench/loads.py reads (bench/wrk_report.lua, shared by the wrk scripts).
local report = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "wrk_report.lua")

function done(summary, latency, requests)
  report(threads, summary, latency)
end
