-- Settle one request: release its concurrency slot, refund (or charge) the token estimate.
-- KEYS[1]: bucket hash   KEYS[2]: slot set
-- ARGV: tpm, refund tokens, slot id ('' = none), shown tpm (0 = none: see admit.lua)
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and refund ~= 0 then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 't'))
  if tokens ~= nil then
    redis.call('HSET', KEYS[1], 't', math.min(tpm, tokens + refund))
  end
end
local stpm = tonumber(ARGV[4] or '0')
if stpm > 0 and refund ~= 0 then
  local shown = tonumber(redis.call('HGET', KEYS[1], 'st'))
  if shown ~= nil then
    redis.call('HSET', KEYS[1], 'st', math.min(stpm, shown + refund))
  end
end
return 1
