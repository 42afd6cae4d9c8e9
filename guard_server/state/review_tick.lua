-- One tick of a replica's review state: add its clients' latest board values, drop clients
-- idle for longer than a risk profile lives and pins that expired, and return the top of the
-- board and the pins in force.
-- KEYS[1]: board (zset client -> value)  KEYS[2]: last noted (zset client -> Unix time)
-- KEYS[3]: pins (hash client -> JSON)
-- ARGV: now (Unix time), idle cutoff (Unix time), k, then client, value, client, value, ...
local now, cutoff, k = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  redis.call('ZADD', KEYS[2], now, ARGV[i])
end
local idle = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, 1000)
if #idle > 0 then
  redis.call('ZREM', KEYS[1], unpack(idle))
  redis.call('ZREM', KEYS[2], unpack(idle))
end
local pins = redis.call('HGETALL', KEYS[3])
local live = {}
for i = 1, #pins, 2 do
  if tonumber(cjson.decode(pins[i + 1])['until']) > now then
    live[#live + 1] = pins[i]
    live[#live + 1] = pins[i + 1]
  else
    redis.call('HDEL', KEYS[3], pins[i])
  end
end
local top = {}
if k > 0 then
  top = redis.call('ZREVRANGE', KEYS[1], 0, k - 1, 'WITHSCORES')
end
return {top, live}
