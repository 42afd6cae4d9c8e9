-- Count one end user among the distinct end users a client named in the DAY window.
-- KEYS: the client's end-user HyperLogLog bucket keys of the DAY window, oldest first (the
--   current one last)
-- ARGV: the end user's scope id, ms until the current bucket leaves the window
redis.call('PFADD', KEYS[#KEYS], ARGV[1])
redis.call('PEXPIRE', KEYS[#KEYS], ARGV[2])
return redis.call('PFCOUNT', unpack(KEYS))
