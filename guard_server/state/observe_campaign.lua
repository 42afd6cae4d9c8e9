-- Update the profile of everyone sharing one request fingerprint and return it.
-- KEYS[1]: campaign hash; then the DAY window's member HyperLogLog bucket keys, oldest first
--   (the current one last), then its prompt bucket keys, likewise
-- ARGV: client id, max top-k (0/1), share alpha, idle ttl (ms), ms until the current bucket
--       leaves the window, whether to return the counts (0/1), then one prompt hash per prompt
local buckets = (#KEYS - 1) / 2
local prompts = #ARGV - 6
local members_key, prompts_key = KEYS[1 + buckets], KEYS[#KEYS]
redis.call('PFADD', members_key, ARGV[1])
redis.call('PFADD', prompts_key, unpack(ARGV, 7))
redis.call('PEXPIRE', members_key, ARGV[5])
redis.call('PEXPIRE', prompts_key, ARGV[5])
local mt = tonumber(redis.call('HGET', KEYS[1], 'mt')) or 0
mt = mt + (1 - math.pow(1 - tonumber(ARGV[3]), prompts)) * (tonumber(ARGV[2]) - mt)
redis.call('HSET', KEYS[1], 'mt', mt)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[6] == '0' then return 0 end
return {redis.call('PFCOUNT', unpack(KEYS, 2, 1 + buckets)),
  redis.call('PFCOUNT', unpack(KEYS, 2 + buckets, #KEYS)), tostring(mt)}
