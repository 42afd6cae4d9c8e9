-- Atomic admission for one scope: refill both token buckets, drop expired concurrency
-- slots, and consume only if every limit passes. Time is Redis' own, shared by replicas.
-- KEYS[1]: bucket hash {r, t, ts}   KEYS[2]: sorted set of slots scored by expiry (ms)
-- ARGV: rpm, tpm, concurrency (0 = unlimited), tokens, slot id, slot ttl (ms), requests
--       (a batch costs one request per prompt)
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want, slot, ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local cost = tonumber(ARGV[7]) or 1

local saved = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local requests, tokens, updated = tonumber(saved[1]), tonumber(saved[2]), tonumber(saved[3])
if updated == nil then
  requests, tokens, updated = rpm, tpm, now
end
local elapsed = math.max(0, now - updated)
if rpm > 0 then requests = math.min(rpm, requests + elapsed * rpm / 60000) end
if tpm > 0 then tokens = math.min(tpm, tokens + elapsed * tpm / 60000) end

local in_flight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[2])
end

local needed = math.min(want, tpm)
local needed_requests = math.min(cost, rpm)
local verdict, retry_ms = 'ok', 0
if rpm > 0 and requests < needed_requests then
  verdict, retry_ms = 'requests', (needed_requests - requests) * 60000 / rpm
elseif tpm > 0 and tokens < needed then
  verdict, retry_ms = 'tokens', (needed - tokens) * 60000 / tpm
elseif conc > 0 and in_flight >= conc then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  verdict, retry_ms = 'concurrency', math.max(0, tonumber(first[2]) - now)
end

if verdict == 'ok' then
  if rpm > 0 then requests = requests - cost end
  if tpm > 0 then tokens = tokens - want end
  if conc > 0 then
    redis.call('ZADD', KEYS[2], now + ttl, slot)
    redis.call('PEXPIRE', KEYS[2], ttl)
    in_flight = in_flight + 1
  end
end
redis.call('HSET', KEYS[1], 'r', requests, 't', tokens, 'ts', now)
-- An idle bucket is full again after a minute: let Redis forget it then.
redis.call('PEXPIRE', KEYS[1], 60000)
return {verdict, tostring(requests), tostring(tokens), in_flight, math.ceil(retry_ms)}
