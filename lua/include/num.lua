-- num.lua: numbers sent back to Redis, and the three metrics' field suffixes.
--
-- Numbers are Lua doubles: exact for integers below 2^53. Every number sent back to Redis goes
-- through fmt() (string.format '%d'; scan() inlines the same call) because tostring() would print
-- large integers in exponent form. Values read from Redis stay strings until arithmetic converts
-- them (`s + 0`), and the totals go back to the client as decimal strings.

local M = {'t', 'c', 'r'}
local sformat = string.format

local function fmt(n)
  return sformat('%d', n)
end
