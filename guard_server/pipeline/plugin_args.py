"""The ``vllm_xargs`` the guard sends to its vLLM plugin: noise, forced bounds, watermark.

This is the whole contract with ``guard_server.vllm_plugin``; a client's own ``vllm_xargs``
never gets here (the policy stage strips it).
"""

from __future__ import annotations

from typing import Any

from guard_server.defences.keys import sampling_noise_seed, watermark_key
from guard_server.pipeline.context import RequestContext

_PERTURB_LEVELS = ("perturb", "decoy", "block")


def plugin_args(ctx: RequestContext) -> dict[str, Any]:
    """The plugin parameters for this request (empty: the plugin leaves it untouched)."""
    assert ctx.client is not None
    tier = ctx.client.tier
    sampling = tier.sampling
    sigma = sampling.noise.sigma
    if ctx.action in _PERTURB_LEVELS:
        sigma = max(sigma, tier.detection.perturb.sampling_sigma)
    if ctx.decoy_source == "perturbed":
        sigma = max(sigma, tier.detection.decoy.perturbed_sigma)
    args: dict[str, Any] = {}
    if sigma > 0:
        args["guard_noise_seed"] = sampling_noise_seed(ctx.settings.secret, ctx.client.id, ctx.body)
        args["guard_noise_sigma"] = sigma
        args["guard_noise_kind"] = sampling.noise.kind
    bounds = sampling.bounds
    if bounds.top_k is not None:
        args["guard_top_k"] = bounds.top_k
    if bounds.top_p is not None:
        args["guard_top_p"] = bounds.top_p
    if bounds.min_p is not None:
        args["guard_min_p"] = bounds.min_p
    if sampling.watermark.enabled:
        args["guard_wm_key"] = watermark_key(ctx.settings.secret, ctx.client.id)
        args["guard_wm_gamma"] = sampling.watermark.gamma
        args["guard_wm_delta"] = sampling.watermark.delta
    return args
