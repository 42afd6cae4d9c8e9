-- wrk script: POST a JSON body; print a JSON summary at the end (one line, "WRK_JSON {...}").
-- Environment:
--   BENCH_PATH      request path (default /v1/chat/completions)
--   BENCH_BODY      path of the body file; "{n}" in it is replaced by a request counter
--   BENCH_VARY      the counter cycles through 0..BENCH_VARY-1 (default 64 distinct prompts)
--   BENCH_KEY       bearer key sent with every request (unset: no Authorization header)
--   BENCH_KEYS      N > 0: rotate over BENCH_KEY_PREFIX .. i for i in 0..N-1 (zero-padded 7)
--   BENCH_KEY_PREFIX prefix of the rotated keys (default sk-bench-)

local path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
local body_file = os.getenv("BENCH_BODY")
local key = os.getenv("BENCH_KEY")
local n_keys = tonumber(os.getenv("BENCH_KEYS") or "0")
local key_prefix = os.getenv("BENCH_KEY_PREFIX") or "sk-bench-"
local vary = tonumber(os.getenv("BENCH_VARY") or "64")
local template = '{"model":"teacher","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
local counter = 0
local thread_id = 0
local threads = {}

if body_file then
  local f = assert(io.open(body_file, "r"))
  template = f:read("*a")
  f:close()
end
local varies = template:find("{n}", 1, true) ~= nil
local fixed_request = nil

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_id = tonumber(wrk.thread:get("thread_id")) or 0
  math.randomseed(1234 + thread_id)
  counter = thread_id * 7
  if not varies and n_keys == 0 then
    local headers = {["Content-Type"] = "application/json"}
    if key then headers["Authorization"] = "Bearer " .. key end
    fixed_request = wrk.format("POST", path, headers, template)
  end
end

function request()
  if fixed_request then return fixed_request end
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json"}
  if n_keys > 0 then
    headers["Authorization"] = string.format("Bearer %s%07d", key_prefix, math.random(0, n_keys - 1))
  elseif key then
    headers["Authorization"] = "Bearer " .. key
  end
  local body = template
  if varies then body = template:gsub("{n}", tostring(counter % vary)) end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
