-- Update the profile of everyone sharing one request fingerprint and return it.
-- keys[1]: campaign hash; then the DAY window's member HyperLogLog bucket keys, oldest first
--   (the current one last), then its prompt bucket keys, likewise (only the current ones
--   when the counts are not returned)
-- argv: client id, max top-k (0/1), share alpha, idle ttl (ms), ms until the current bucket
--       leaves the window, whether to return the counts (0/1)   hashes: one prompt hash per prompt
local function observe_campaign(keys, argv, hashes)
  local buckets = (#keys - 1) / 2
  local prompts = #hashes
  local members_key, prompts_key = keys[1 + buckets], keys[#keys]
  redis.call('PFADD', members_key, argv[1])
  redis.call('PFADD', prompts_key, unpack(hashes))
  redis.call('PEXPIRE', members_key, argv[5])
  redis.call('PEXPIRE', prompts_key, argv[5])
  local mt = tonumber(redis.call('HGET', keys[1], 'mt')) or 0
  mt = mt + (1 - math.pow(1 - tonumber(argv[3]), prompts)) * (tonumber(argv[2]) - mt)
  redis.call('HSET', keys[1], 'mt', mt)
  redis.call('PEXPIRE', keys[1], argv[4])
  if argv[6] == '0' then return 0 end
  return {redis.call('PFCOUNT', unpack(keys, 2, 1 + buckets)),
    redis.call('PFCOUNT', unpack(keys, 2 + buckets, #keys)), tostring(mt)}
end
