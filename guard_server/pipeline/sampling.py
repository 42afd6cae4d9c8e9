"""Sampling controls inside vLLM: the plan's noise, forced bounds and watermark, sent to the
guard's plugin as ``vllm_xargs``.

This is the whole contract with ``guard_server.vllm_plugin``; a client's own ``vllm_xargs``
never gets here (the policy stage strips it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard_server.config.schema import SamplingBounds, Watermark
from guard_server.defences.keys import sampling_noise_seed, watermark_key
from guard_server.pipeline.context import RequestContext


@dataclass(frozen=True, slots=True)
class SamplingPlan:
    """What the plugin does to one request's sampling."""

    noise_sigma: float
    noise_kind: str
    bounds: SamplingBounds
    watermark: Watermark


def plugin_args(ctx: RequestContext) -> dict[str, Any]:
    """The plugin parameters for this request (empty: the plugin leaves it untouched)."""
    assert ctx.client is not None and ctx.plan is not None and ctx.canonical is not None
    sampling = ctx.plan.sampling
    args: dict[str, Any] = {}
    if sampling.noise_sigma > 0:
        identity = ctx.canonical.batch_identity
        args["guard_noise_seed"] = sampling_noise_seed(ctx.settings.secret, ctx.client.id, identity)
        args["guard_noise_sigma"] = sampling.noise_sigma
        args["guard_noise_kind"] = sampling.noise_kind
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


class SamplingControls:
    """Sends the plan's sampling controls to the plugin; nothing to do on the way back."""

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """Add ``vllm_xargs`` when the upstream runs the guard's plugin."""
        if not guard_plugin:
            return
        args = plugin_args(ctx)
        if args:
            body["vllm_xargs"] = args

    def response(self, ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
        """Nothing: the plugin's work is already in the sampled text."""
