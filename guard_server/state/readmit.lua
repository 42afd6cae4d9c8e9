-- Correct a speculative admission the plan did not confirm, atomically: give back what it
-- took (`undo`), then admit the request under the plan's limits (`admit`), if any.
-- KEYS: bucket hash, slot set   ARGV: undo's five arguments, then admit's (none: undo only)
local taken = {unpack(ARGV, 1, 5)}
undo(KEYS, taken)
if #ARGV == 5 then return 0 end
return admit(KEYS, {unpack(ARGV, 6)})
