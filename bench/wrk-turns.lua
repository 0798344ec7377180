-- wrk script: avr-core-shaped turns for calls whose callers were registered beforehand.
-- Usage: wrk -s bench/wrk-turns.lua http://127.0.0.1:6017 -- <file with one call UUID per line>
local uuids = {}
local next_index = 0

function init(args)
  for line in io.lines(args[1]) do uuids[#uuids + 1] = line end
  next_index = math.random(#uuids)
end

request = function()
  next_index = next_index % #uuids + 1
  local body = '{"uuid":"' .. uuids[next_index] .. '","message":"hola, necesito ayuda","messages":['
    .. '{"role":"system","content":"You are an AI assistant. You must introduce yourself quickly and concisely."},'
    .. '{"role":"user","content":"hola, necesito ayuda"}]}'
  return wrk.format("POST", "/prompt-stream", {["Content-Type"] = "application/json"}, body)
end
