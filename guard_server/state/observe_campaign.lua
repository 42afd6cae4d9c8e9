-- Update the profile of everyone sharing one request fingerprint and return it.
-- KEYS[1]: campaign hash   KEYS[2]: HLL of member clients   KEYS[3]: HLL of prompt hashes
-- ARGV: client id, max top-k (0/1), share alpha, idle ttl (ms), then one prompt hash per prompt
local prompts = #ARGV - 4
redis.call('PFADD', KEYS[2], ARGV[1])
redis.call('PFADD', KEYS[3], unpack(ARGV, 5))
local mt = tonumber(redis.call('HGET', KEYS[1], 'mt')) or 0
mt = mt + (1 - math.pow(1 - tonumber(ARGV[3]), prompts)) * (tonumber(ARGV[2]) - mt)
redis.call('HSET', KEYS[1], 'mt', mt)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return {redis.call('PFCOUNT', KEYS[2]), redis.call('PFCOUNT', KEYS[3]), tostring(mt)}
