-- Argo CD health for promptcache.io PlanReplay: from its phase, once the latest spec is observed.
local hs = {}
local generation = obj.metadata and obj.metadata.generation
if obj.status == nil or obj.status.phase == nil or
    (generation ~= nil and (obj.status.observedGeneration or 0) < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the replay of the latest spec"
  return hs
end
local phase = obj.status.phase
local reason = ""
for _, c in ipairs(obj.status.conditions or {}) do
  if c.type == "Ready" or c.type == "Stalled" then
    reason = (c.reason or "") .. ((c.message ~= nil and c.message ~= "") and (": " .. c.message) or "")
  end
end
if phase == "Succeeded" then
  hs.status = "Healthy"
  local savings = obj.status.summary and obj.status.summary.savingsPct
  hs.message = savings and ("projected savings " .. savings .. "%") or "replay finished"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = reason ~= "" and reason or "replay failed"
else
  hs.status = "Progressing"
  hs.message = "replay " .. string.lower(phase)
end
return hs
