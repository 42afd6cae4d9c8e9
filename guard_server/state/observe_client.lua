-- Update one client's risk profile with one request and return it. A request counts as
-- one request per prompt it batches; its timing counts once.
-- keys[1]: profile hash; then the DAY window's HyperLogLog bucket keys, oldest first (the
--   current one last), then the WEEK window's, likewise (only the current ones when the
--   counts are not returned)
-- argv: fingerprint, wants logprobs (0/1), max top-k (0/1), logit_bias (0/1), share alpha,
--       gap alpha, half-life (s), idle ttl (ms), now (s), current DAY bucket index, DAY
--       buckets, ms until the current DAY / WEEK bucket leaves its window, whether to return
--       the counts (0/1)   hashes: one prompt hash per prompt
-- Buckets are only ever added to; they expire when they leave their window, so the volume
-- signals forget (the profile hash, decayed shares only, lives while the client is active).
local function observe_client(keys, argv, hashes)
  local now = tonumber(argv[9])
  local alpha, gap_alpha, half_life = tonumber(argv[5]), tonumber(argv[6]), tonumber(argv[7])
  local day_bucket, day_buckets = tonumber(argv[10]), tonumber(argv[11])
  local prompts = #hashes
  local want = argv[14] ~= '0'
  -- without the counts only the current buckets are needed (and given)
  local day_n = want and day_buckets or 1
  local p = redis.call('HMGET', keys[1], 'n', 'ts', 'total', 'lp', 'mt', 'lb', 'gm', 'gs', 'fp',
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
  lp = lp + weight * (tonumber(argv[2]) - lp)
  mt = mt + weight * (tonumber(argv[3]) - mt)
  lb = lb + weight * (tonumber(argv[4]) - lb)
  if p[9] then  -- a client's first request has nothing to repeat
    local same = 0
    if p[9] == argv[1] then same = 1 end
    tp = tp + weight * (same - tp)
  end
  redis.call('HSET', keys[1], 'n', n, 'ts', now, 'total', total, 'lp', lp, 'mt', mt, 'lb', lb,
    'fp', argv[1], 'tp', tp, 'since', since)
  if gm ~= nil then redis.call('HSET', keys[1], 'gm', gm, 'gs', gs) end
  -- prompts per DAY bucket, as hash fields q<bucket>; fields that left the window are dropped
  local asked = redis.call('HINCRBY', keys[1], 'q' .. day_bucket, prompts)
  if asked == prompts then
    for _, name in ipairs(redis.call('HKEYS', keys[1])) do
      if string.sub(name, 1, 1) == 'q' and tonumber(string.sub(name, 2)) <= day_bucket - day_buckets then
        redis.call('HDEL', keys[1], name)
      end
    end
  end
  redis.call('PEXPIRE', keys[1], argv[8])
  local day_key, week_key = keys[1 + day_n], keys[#keys]
  redis.call('PFADD', day_key, unpack(hashes))
  redis.call('PFADD', week_key, unpack(hashes))
  redis.call('PEXPIRE', day_key, argv[12])
  redis.call('PEXPIRE', week_key, argv[13])
  if not want then return 0 end
  local fields = {}
  for b = day_bucket - day_buckets + 1, day_bucket do fields[#fields + 1] = 'q' .. b end
  local window_requests = 0
  for _, v in ipairs(redis.call('HMGET', keys[1], unpack(fields))) do
    window_requests = window_requests + (tonumber(v) or 0)
  end
  local day = redis.call('PFCOUNT', unpack(keys, 2, 1 + day_buckets))
  local week = redis.call('PFCOUNT', unpack(keys, 2 + day_buckets))
  return {tostring(n), total, day, week, window_requests, tostring(lp), tostring(mt), tostring(lb),
    tostring(gm or 0), tostring(gs or 0), tostring(tp), tostring(now - since)}
end
