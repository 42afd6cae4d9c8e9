-- Update one client's risk profile with one request and return it. A request counts as
-- one request per prompt it batches; its timing counts once.
-- KEYS[1]: profile hash   KEYS[2]: HyperLogLog of the client's prompt hashes
-- ARGV: fingerprint, wants logprobs (0/1), max top-k (0/1), logit_bias (0/1), share alpha,
--       gap alpha, half-life (s), idle ttl (ms), then one prompt hash per prompt
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local alpha, gap_alpha, half_life = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local prompts = #ARGV - 8
local p = redis.call('HMGET', KEYS[1], 'n', 'ts', 'total', 'lp', 'mt', 'lb', 'gm', 'gs')
local n, ts, total = tonumber(p[1]) or 0, tonumber(p[2]), tonumber(p[3]) or 0
local lp, mt, lb = tonumber(p[4]) or 0, tonumber(p[5]) or 0, tonumber(p[6]) or 0
local gm, gs = tonumber(p[7]), tonumber(p[8])
if ts ~= nil then
  local gap = math.max(0, now - ts)
  n = n * math.pow(2, -gap / half_life)
  if gm == nil then
    gm, gs = gap, gap * gap
  else
    gm = gm + gap_alpha * (gap - gm)
    gs = gs + gap_alpha * (gap * gap - gs)
  end
end
n, total = n + prompts, total + prompts
-- `prompts` steps of the moving average at once
local weight = 1 - math.pow(1 - alpha, prompts)
lp = lp + weight * (tonumber(ARGV[2]) - lp)
mt = mt + weight * (tonumber(ARGV[3]) - mt)
lb = lb + weight * (tonumber(ARGV[4]) - lb)
redis.call('PFADD', KEYS[2], unpack(ARGV, 9))
local distinct = redis.call('PFCOUNT', KEYS[2])
redis.call('HSET', KEYS[1], 'n', n, 'ts', now, 'total', total, 'lp', lp, 'mt', mt, 'lb', lb,
  'fp', ARGV[1])
if gm ~= nil then redis.call('HSET', KEYS[1], 'gm', gm, 'gs', gs) end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return {tostring(n), total, distinct, tostring(lp), tostring(mt), tostring(lb),
  tostring(gm or 0), tostring(gs or 0)}
