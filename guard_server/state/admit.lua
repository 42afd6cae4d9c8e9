-- Atomic admission for one scope: refill both token buckets, drop expired concurrency
-- slots, and consume only if every limit passes. Time is Redis' own, shared by replicas.
-- keys[1]: bucket hash {r, t, ts, sr, st}   keys[2]: sorted set of slots scored by expiry (ms)
-- argv: rpm, tpm, concurrency (0 = unlimited), tokens, slot id, slot ttl (ms), requests
-- (a batch costs one request per prompt), shown rpm, shown tpm (0 = not tightened). While
-- tightened, sr/st are the configured limits' buckets (what the headers show): they continue
-- r/t as they were, spend what r/t spend, and r/t take their level back when tightening ends.
-- argv[10] = '1': a speculative admission (see observe_admit.lua), which returns {'defer'}
-- instead of ending a tightening (that step is the one `undo` could not take back exactly).
local function admit(keys, argv)
  local now_parts = redis.call('TIME')
  local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
  local rpm, tpm, conc = tonumber(argv[1]), tonumber(argv[2]), tonumber(argv[3])
  local want, slot, ttl = tonumber(argv[4]), argv[5], tonumber(argv[6])
  local cost = tonumber(argv[7]) or 1
  local srpm, stpm = tonumber(argv[8] or '0'), tonumber(argv[9] or '0')

  local saved = redis.call('HMGET', keys[1], 'r', 't', 'ts', 'sr', 'st')
  local requests, tokens, updated = tonumber(saved[1]), tonumber(saved[2]), tonumber(saved[3])
  local shown_r, shown_t = tonumber(saved[4]), tonumber(saved[5])
  if argv[10] == '1' and ((srpm == 0 and saved[4]) or (stpm == 0 and saved[5])) then
    return {'defer'}
  end
  if updated == nil then
    requests, tokens, updated = math.max(rpm, srpm), math.max(tpm, stpm), now
  end
  local elapsed = math.max(0, now - updated)
  -- The shown buckets: continued (or started from the level r/t had) while tightened ...
  if srpm > 0 then
    shown_r = math.min(srpm, (shown_r or requests) + elapsed * srpm / 60000)
  elseif shown_r ~= nil then
    requests, shown_r = shown_r, nil  -- ... and taken back by r/t when tightening ends
  end
  if stpm > 0 then
    shown_t = math.min(stpm, (shown_t or tokens) + elapsed * stpm / 60000)
  elseif shown_t ~= nil then
    tokens, shown_t = shown_t, nil
  end
  if rpm > 0 then requests = math.min(rpm, requests + elapsed * rpm / 60000) end
  if tpm > 0 then tokens = math.min(tpm, tokens + elapsed * tpm / 60000) end

  local in_flight = 0
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', now)
    in_flight = redis.call('ZCARD', keys[2])
  end

  local needed = math.min(want, tpm)
  local needed_requests = math.min(cost, rpm)
  local verdict, retry_ms = 'ok', 0
  if rpm > 0 and requests < needed_requests then
    verdict, retry_ms = 'requests', (needed_requests - requests) * 60000 / rpm
  elseif tpm > 0 and tokens < needed then
    verdict, retry_ms = 'tokens', (needed - tokens) * 60000 / tpm
  elseif conc > 0 and in_flight >= conc then
    local first = redis.call('ZRANGE', keys[2], 0, 0, 'WITHSCORES')
    verdict, retry_ms = 'concurrency', math.max(0, tonumber(first[2]) - now)
  end

  if verdict == 'ok' then
    if rpm > 0 then requests = requests - cost end
    if tpm > 0 then tokens = tokens - want end
    if shown_r ~= nil then shown_r = shown_r - cost end
    if shown_t ~= nil then shown_t = shown_t - want end
    if conc > 0 then
      redis.call('ZADD', keys[2], now + ttl, slot)
      redis.call('PEXPIRE', keys[2], ttl)
      in_flight = in_flight + 1
    end
  end
  redis.call('HSET', keys[1], 'r', requests, 't', tokens, 'ts', now)
  if shown_r ~= nil then redis.call('HSET', keys[1], 'sr', shown_r)
  elseif saved[4] then redis.call('HDEL', keys[1], 'sr') end
  if shown_t ~= nil then redis.call('HSET', keys[1], 'st', shown_t)
  elseif saved[5] then redis.call('HDEL', keys[1], 'st') end
  -- An idle bucket is full again after a minute: let Redis forget it then.
  redis.call('PEXPIRE', keys[1], 60000)
  return {verdict, tostring(requests), tostring(tokens), in_flight, math.ceil(retry_ms),
          tostring(shown_r or requests), tostring(shown_t or tokens)}
end

-- Give back what an earlier admission of this scope took: its slot, its requests and its
-- tokens (to the shown buckets too, which spent them as well, or took them over since).
-- argv: that admission's rpm and tpm (0 = not counted), requests, tokens, slot ('' = none)
local function undo(keys, argv)
  if argv[5] ~= '' then redis.call('ZREM', keys[2], argv[5]) end
  local saved = redis.call('HMGET', keys[1], 'r', 't', 'sr', 'st')
  local cost, tokens = tonumber(argv[3]), tonumber(argv[4])
  if tonumber(argv[1]) > 0 and saved[1] then redis.call('HSET', keys[1], 'r', saved[1] + cost) end
  if tonumber(argv[2]) > 0 and saved[2] then redis.call('HSET', keys[1], 't', saved[2] + tokens) end
  if saved[3] then redis.call('HSET', keys[1], 'sr', saved[3] + cost) end
  if saved[4] then redis.call('HSET', keys[1], 'st', saved[4] + tokens) end
end
