-- Update one client's risk profile with one request and return it. A request counts as
-- one request per prompt it batches; its timing counts once.
-- KEYS[1]: profile hash; then the DAY window's HyperLogLog bucket keys, oldest first (the
--   current one last), then the WEEK window's, likewise
-- ARGV: fingerprint, wants logprobs (0/1), max top-k (0/1), logit_bias (0/1), share alpha,
--       gap alpha, half-life (s), idle ttl (ms), now (s), current DAY bucket index, DAY
--       buckets, ms until the current DAY / WEEK bucket leaves its window, whether to return
--       the counts (0/1), then one prompt hash per prompt
-- Buckets are only ever added to; they expire when they leave their window, so the volume
-- signals forget (the profile hash, decayed shares only, lives while the client is active).
local now = tonumber(ARGV[9])
local alpha, gap_alpha, half_life = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local day_bucket, day_buckets = tonumber(ARGV[10]), tonumber(ARGV[11])
local week_buckets = #KEYS - 1 - day_buckets
local prompts = #ARGV - 14
local p = redis.call('HMGET', KEYS[1], 'n', 'ts', 'total', 'lp', 'mt', 'lb', 'gm', 'gs', 'fp',
  'tp', 'since')
local n, ts, total = tonumber(p[1]) or 0, tonumber(p[2]), tonumber(p[3]) or 0
local lp, mt, lb = tonumber(p[4]) or 0, tonumber(p[5]) or 0, tonumber(p[6]) or 0
local gm, gs, tp = tonumber(p[7]), tonumber(p[8]), tonumber(p[10]) or 0
local since = tonumber(p[11]) or now
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
if p[9] then  -- a client's first request has nothing to repeat
  local same = 0
  if p[9] == ARGV[1] then same = 1 end
  tp = tp + weight * (same - tp)
end
redis.call('HSET', KEYS[1], 'n', n, 'ts', now, 'total', total, 'lp', lp, 'mt', mt, 'lb', lb,
  'fp', ARGV[1], 'tp', tp, 'since', since)
if gm ~= nil then redis.call('HSET', KEYS[1], 'gm', gm, 'gs', gs) end
-- prompts per DAY bucket, as hash fields q<bucket>; fields that left the window are dropped
local asked = redis.call('HINCRBY', KEYS[1], 'q' .. day_bucket, prompts)
if asked == prompts then
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(name, 1, 1) == 'q' and tonumber(string.sub(name, 2)) <= day_bucket - day_buckets then
      redis.call('HDEL', KEYS[1], name)
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
local day_key, week_key = KEYS[1 + day_buckets], KEYS[#KEYS]
redis.call('PFADD', day_key, unpack(ARGV, 15))
redis.call('PFADD', week_key, unpack(ARGV, 15))
redis.call('PEXPIRE', day_key, ARGV[12])
redis.call('PEXPIRE', week_key, ARGV[13])
if ARGV[14] == '0' then return 0 end
local fields = {}
for b = day_bucket - day_buckets + 1, day_bucket do fields[#fields + 1] = 'q' .. b end
local window_requests = 0
for _, v in ipairs(redis.call('HMGET', KEYS[1], unpack(fields))) do
  window_requests = window_requests + (tonumber(v) or 0)
end
local day = redis.call('PFCOUNT', unpack(KEYS, 2, 1 + day_buckets))
local week = redis.call('PFCOUNT', unpack(KEYS, 2 + day_buckets, 1 + day_buckets + week_buckets))
return {tostring(n), total, day, week, window_requests, tostring(lp), tostring(mt), tostring(lb),
  tostring(gm or 0), tostring(gs or 0), tostring(tp), tostring(now - since)}
