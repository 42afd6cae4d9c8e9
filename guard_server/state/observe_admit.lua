-- One request's whole hot path in one call: fold it into its client's and its fingerprint's
-- profiles (observe_client, observe_campaign) and take its admission under the limits its
-- plan is expected to have (admit, speculative: the pipeline corrects it with readmit.lua in
-- the rare case the plan turns out otherwise).
-- KEYS: observe_client's, observe_campaign's, then admit's (bucket hash, slot set) if any
-- ARGV: how many keys are observe_client's, observe_campaign's; how many arguments are
--   observe_client's, observe_campaign's, admit's (0: no admission); those arguments in that
--   order; then one prompt hash per prompt
-- Returns {client profile or 0, campaign profile or 0, admit's reply or 0}.
local client_keys, campaign_keys = tonumber(ARGV[1]), tonumber(ARGV[2])
local client_args, campaign_args, admit_args = tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5])
local first = 6
local function take(n)
  local part = {unpack(ARGV, first, first + n - 1)}
  first = first + n
  return part
end
local client_argv, campaign_argv, admit_argv = take(client_args), take(campaign_args),
  take(admit_args)
local hashes = {unpack(ARGV, first)}
local verdict = 0
if admit_args > 0 then
  verdict = admit({KEYS[client_keys + campaign_keys + 1], KEYS[client_keys + campaign_keys + 2]},
    admit_argv)
end
return {
  observe_client({unpack(KEYS, 1, client_keys)}, client_argv, hashes),
  observe_campaign({unpack(KEYS, client_keys + 1, client_keys + campaign_keys)}, campaign_argv,
    hashes),
  verdict,
}
