"""Apply the tier policy: allowed models and fields, and bounds that clamp or reject."""

from __future__ import annotations

import math

from guard_server.config.schema import Bound
from guard_server.defences.keys import rekeyed_seed
from guard_server.errors import bad_request, model_not_found
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext

# -1 asks vLLM for every token's logprob: larger than any bound.
_ALL_MEANS_UNBOUNDED = frozenset({"prompt_logprobs"})


async def apply_tier_policy(ctx: RequestContext) -> None:
    """Enforce what the caller's tier may ask for, rewriting clamped values in place."""
    assert ctx.client is not None
    tier = ctx.client.tier
    body = ctx.body
    if ctx.model not in ctx.settings.model_names or not tier.may_use(ctx.model):
        raise model_not_found(ctx.model)
    for name in body:
        if name not in tier.allowed_fields and name != "vllm_xargs":
            raise bad_request(
                f"`{name}` is not allowed for tier `{tier.name}`.",
                param=name,
                code="parameter_not_allowed",
            )
    if "vllm_xargs" in body:
        del body["vllm_xargs"]
        ctx.policy_actions.append(("stripped", "vllm_xargs"))
    for name, bound in tier.bounds.items():
        targets = ("max_tokens", "max_completion_tokens") if name == "max_tokens" else (name,)
        for field in targets:
            _enforce_bound(ctx, field, bound)
    _cap_logprobs(ctx)
    _apply_logit_bias_policy(ctx)
    _apply_seed_policy(ctx)
    if tier.hardening.active and wants_logprobs(ctx):
        ctx.policy_actions.append(("hardened", "logprobs"))
    max_tokens = tier.bounds.get("max_tokens")
    if (
        ctx.endpoint is Endpoint.CHAT
        and max_tokens is not None
        and max_tokens.max is not None
        and body.get("max_tokens") is None
        and body.get("max_completion_tokens") is None
    ):
        body["max_tokens"] = int(max_tokens.max)


def _enforce_bound(ctx: RequestContext, field: str, bound: Bound) -> None:
    value = ctx.body.get(field)
    if value is None or isinstance(value, bool):
        return
    effective = math.inf if (field in _ALL_MEANS_UNBOUNDED and value == -1) else value
    if bound.max is not None and effective > bound.max:
        limit, side = bound.max, "above the maximum"
    elif bound.min is not None and effective < bound.min:
        limit, side = bound.min, "below the minimum"
    else:
        return
    tier = ctx.client.tier.name if ctx.client else "none"
    if bound.on_exceed == "reject":
        raise bad_request(
            f"`{field}` is {value}, {side} of {_show(limit)} allowed for tier `{tier}`.",
            param=field,
            code="value_out_of_range",
        )
    ctx.body[field] = int(limit) if isinstance(value, int) else float(limit)
    ctx.policy_actions.append(("clamped", field))


def wants_logprobs(ctx: RequestContext) -> bool:
    """Whether the request (as rewritten so far) asks for logprob values."""
    value = ctx.body.get("logprobs")
    if ctx.endpoint is Endpoint.CHAT:
        return value is True
    return value is not None


def _cap_logprobs(ctx: RequestContext) -> None:
    """Cap ``top_logprobs`` (chat) / ``logprobs`` (completions); 0 means no logprobs at all."""
    assert ctx.client is not None
    policy = ctx.client.tier.logprobs
    body = ctx.body
    count_field = "top_logprobs" if ctx.endpoint is Endpoint.CHAT else "logprobs"
    count = body.get(count_field)
    if policy.max_top == 0 and wants_logprobs(ctx):
        if policy.on_exceed == "reject":
            raise bad_request(
                f"Logprobs are not available to tier `{ctx.client.tier.name}`.",
                param="logprobs",
                code="value_out_of_range",
            )
        body.pop("logprobs", None)
        body.pop("top_logprobs", None)
        ctx.policy_actions.append(("stripped", "logprobs"))
        return
    # Validation has typed the count as an int; -1 asks for the whole vocabulary.
    if count is not None and (count == -1 or count > policy.max_top):
        if policy.on_exceed == "reject":
            raise bad_request(
                f"`{count_field}` is {count}, above the maximum of {policy.max_top} "
                f"allowed for tier `{ctx.client.tier.name}`.",
                param=count_field,
                code="value_out_of_range",
            )
        body[count_field] = policy.max_top
        ctx.policy_actions.append(("clamped", count_field))
    if body.get("echo") and wants_logprobs(ctx) and not policy.allow_echo:
        raise bad_request(
            "`echo` together with logprobs is not allowed for this tier.",
            param="echo",
            code="parameter_not_allowed",
        )


def _apply_logit_bias_policy(ctx: RequestContext) -> None:
    assert ctx.client is not None
    policy = ctx.client.tier.logit_bias
    bias = ctx.body.get("logit_bias")
    if not bias:
        return
    if policy.mode == "strip":
        del ctx.body["logit_bias"]
        ctx.policy_actions.append(("stripped", "logit_bias"))
        return
    if policy.mode == "reject":
        raise bad_request(
            "`logit_bias` is not allowed for this tier.",
            param="logit_bias",
            code="parameter_not_allowed",
        )
    if policy.with_logprobs == "reject" and wants_logprobs(ctx):
        raise bad_request(
            "`logit_bias` cannot be combined with logprobs for this tier.",
            param="logit_bias",
            code="parameter_not_allowed",
        )
    if policy.mode != "limit":
        return
    if len(bias) > policy.max_entries:
        raise bad_request(
            f"`logit_bias` has {len(bias)} entries; this tier allows {policy.max_entries}.",
            param="logit_bias",
            code="value_out_of_range",
        )
    clamped = False
    for token, value in bias.items():
        if not _is_number(value):
            raise bad_request("`logit_bias` values must be numbers.", param="logit_bias")
        if abs(value) > policy.max_abs:
            bias[token] = math.copysign(policy.max_abs, value)
            clamped = True
    if clamped:
        ctx.policy_actions.append(("clamped", "logit_bias"))


def _apply_seed_policy(ctx: RequestContext) -> None:
    assert ctx.client is not None
    mode = ctx.client.tier.seed
    seed = ctx.body.get("seed")
    if seed is None or mode == "allow":
        return
    if mode == "strip":
        del ctx.body["seed"]
        ctx.policy_actions.append(("stripped", "seed"))
        return
    ctx.body["seed"] = rekeyed_seed(ctx.settings.secret, ctx.client.id, ctx.body, seed)
    ctx.policy_actions.append(("rekeyed", "seed"))


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _show(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else str(limit)
