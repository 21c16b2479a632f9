-- wrk script: every request is a Stripe webhook delivery, signed as Stripe signs it (HMAC-SHA256 over
-- "{t}.{body}" with the whsec_ secret, t = now), with the HMAC from the OpenSSL wrk is linked to.
--
-- wrk -s bench/webhook.lua URL -- MODE SECRET TEMPLATE FIRST THREADS ORGANIZATIONS DUPLICATES
--   MODE "fresh": thread i of THREADS sends events FIRST+i, FIRST+i+THREADS, ... (each one new)
--   MODE "duplicate": the same, modulo DUPLICATES (events already stored and processed)
-- The body is TEMPLATE filled as bench/events.py fills it. done() prints one line, "BENCH {json}".

local ffi = require("ffi")
ffi.cdef([[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *md, const void *key, int key_len, const unsigned char *data, size_t data_len,
                    unsigned char *out, unsigned int *out_len);
]])

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

local digest = ffi.new("unsigned char[32]")

local function hmac_sha256_hex(key, message)
  ffi.C.HMAC(ffi.C.EVP_sha256(), key, #key, message, #message, digest, nil)
  local hex = {}
  for i = 0, 31 do
    hex[i + 1] = string.format("%02x", digest[i])
  end
  return table.concat(hex)
end

local mode, secret, template, first, stride, organizations, duplicates

function init(args)
  mode, secret = args[1], args[2]
  local file = assert(io.open(args[3], "rb"))
  template = file:read("*a")
  file:close()
  first, stride, organizations, duplicates = tonumber(args[4]), tonumber(args[5]), tonumber(args[6]), tonumber(args[7])
  sent = 0 -- global: done() reads it with thread:get
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json; charset=utf-8"
  wrk.headers["User-Agent"] = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
  -- As the TLS-terminating proxy forwards it (TRUSTED_PROXY_COUNT=1).
  wrk.headers["X-Forwarded-For"] = "3.18.12.63"
  wrk.headers["X-Forwarded-Proto"] = "https"
end

local function fill(k) -- events.fields(): FIRST_CREATED, SECONDS_BETWEEN_PASSES, PERIOD_SECONDS
  local created = 1700000000 + 10 * math.floor(k / organizations)
  local values = { K = k, ORG = k % organizations, CREATED = created, PERIOD_END = created + 30 * 86400 }
  return (template:gsub("@([A-Z_]+)@", values))
end

function request()
  local k = first + thread_index + stride * sent
  if mode == "duplicate" then
    k = k % duplicates
  end
  sent = sent + 1
  local body = fill(k)
  local t = tostring(os.time())
  wrk.headers["Stripe-Signature"] = "t=" .. t .. ",v1=" .. hmac_sha256_hex(secret, t .. "." .. body)
  return wrk.format(nil, nil, nil, body)
end

-- done(): the "BENCH {json}" line bench/loads.py reads (bench/wrk_report.lua, shared by the wrk scripts).
local report = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "wrk_report.lua")

function done(summary, latency, requests)
  report(threads, summary, latency)
end
