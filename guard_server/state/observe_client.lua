-- Update one client's risk profile with one request and return it.
-- KEYS[1]: profile hash   KEYS[2]: HyperLogLog of the client's prompt hashes
-- ARGV: prompt hash, fingerprint, wants logprobs (0/1), max top-k (0/1), logit_bias (0/1),
--       share alpha, gap alpha, half-life (s), idle ttl (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local alpha, gap_alpha, half_life = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local p = redis.call('HMGET', KEYS[1], 'n', 'ts', 'total', 'lp', 'mt', 'lb', 'gm', 'gs')
local n, ts, total = tonumber(p[1]) or 0, tonumber(p[2]), tonumber(p[3]) or 0
local lp, mt, lb = tonumber(p[4]) or 0, tonumber(p[5]) or 0, tonumber(p[6]) or 0
local gm, gs = tonumber(p[7]) or 0, tonumber(p[8]) or 0
if ts ~= nil then
  local gap = math.max(0, now - ts)
  n = n * math.pow(2, -gap / half_life)
  if total == 1 then
    gm, gs = gap, gap * gap
  else
    gm = gm + gap_alpha * (gap - gm)
    gs = gs + gap_alpha * (gap * gap - gs)
  end
end
n, total = n + 1, total + 1
lp = lp + alpha * (tonumber(ARGV[3]) - lp)
mt = mt + alpha * (tonumber(ARGV[4]) - mt)
lb = lb + alpha * (tonumber(ARGV[5]) - lb)
redis.call('PFADD', KEYS[2], ARGV[1])
local distinct = redis.call('PFCOUNT', KEYS[2])
redis.call('HSET', KEYS[1], 'n', n, 'ts', now, 'total', total, 'lp', lp, 'mt', mt, 'lb', lb,
  'gm', gm, 'gs', gs, 'fp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
return {tostring(n), total, distinct, tostring(lp), tostring(mt), tostring(lb), tostring(gm),
  tostring(gs)}
