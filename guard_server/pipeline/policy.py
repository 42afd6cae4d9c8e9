"""Apply the tier policy: allowed models, fields and content parts, prompts per request, and
bounds that clamp or reject."""

from __future__ import annotations

import math

from guard_server.canonical import first_disallowed_part, prompt_count
from guard_server.config.schema import Bound
from guard_server.detection.end_users import end_user_of
from guard_server.errors import bad_request, model_not_found
from guard_server.openai_fields import FIELDS, Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.logprob_channel import check_tier_cap, wants_logprobs
from guard_server.responses_input import content_part_types

_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
"""The names of the output-token limit a ``max_tokens`` bound applies to."""
_OUTPUT_LIMIT = {
    Endpoint.CHAT: "max_tokens",
    Endpoint.COMPLETIONS: "max_tokens",
    Endpoint.RESPONSES: "max_output_tokens",
}

# -1 asks vLLM for every token's logprob: larger than any bound.
_ALL_MEANS_UNBOUNDED = frozenset({"prompt_logprobs"})


async def apply_tier_policy(ctx: RequestContext) -> None:
    """Enforce what the caller's tier may ask for, rewriting clamped values in place."""
    assert ctx.client is not None
    tier = ctx.client.tier
    body = ctx.body
    if ctx.model not in ctx.settings.public_models or not tier.may_use(ctx.model):
        raise model_not_found(ctx.model)
    ctx.end_user = end_user_of(body)
    for name in list(body):
        if name in tier.allowed_fields or name == "vllm_xargs":
            continue
        if name not in tier.stripped_fields:
            why = FIELDS[name].unpassable
            raise bad_request(
                f"`{name}` is not allowed for tier `{tier.name}`" + (f": {why}." if why else "."),
                param=name,
                code="parameter_not_allowed",
            )
        del body[name]
        ctx.note("stripped", name)
    if "vllm_xargs" in body:
        del body["vllm_xargs"]
        ctx.note("stripped", "vllm_xargs")
    _check_content_parts(ctx)
    _check_prompt_count(ctx)
    for name, bound in tier.bounds.items():
        if name == "max_tokens":
            ceiling = _output_ceiling(ctx, bound)
            for field in _OUTPUT_LIMITS:
                if field in body:
                    _enforce_bound(ctx, field, bound, ceiling)
        elif name in body:
            _enforce_bound(ctx, name, bound)
    check_tier_cap(ctx)
    _apply_logit_bias_policy(ctx)
    _default_max_tokens(ctx)


def _output_ceiling(ctx: RequestContext, bound: Bound) -> float | None:
    """What a clamped or filled-in ``max_tokens`` becomes: the tier's maximum, but never more
    than the model's context length (vLLM refuses a ``max_tokens`` above it)."""
    if bound.max is None or ctx.max_model_len is None:
        return bound.max
    return min(bound.max, ctx.max_model_len)


def _default_max_tokens(ctx: RequestContext) -> None:
    """A chat or responses request without an output limit gets the tier's, named in
    ``x-guard-policy`` (``defaulted=max_tokens``, ``defaulted=max_output_tokens``)."""
    assert ctx.client is not None
    bound = ctx.client.tier.bounds.get("max_tokens")
    body = ctx.body
    if bound is None or not ctx.endpoint.conversational:
        return
    for name in _OUTPUT_LIMITS:
        if body.get(name) is not None:
            return
    ceiling = _output_ceiling(ctx, bound)
    if ceiling is not None:
        field = _OUTPUT_LIMIT[ctx.endpoint]
        body[field] = int(ceiling)
        ctx.note("defaulted", field)


def _check_content_parts(ctx: RequestContext) -> None:
    """Content parts of a type the tier does not allow never reach vLLM."""
    assert ctx.client is not None
    tier = ctx.client.tier
    if ctx.endpoint is Endpoint.CHAT:
        kind = first_disallowed_part(ctx.body["messages"], tier.content_parts)
    elif ctx.endpoint is Endpoint.RESPONSES:
        disallowed = (k for k in content_part_types(ctx.body) if k not in tier.content_parts)
        kind = next(disallowed, None)
    else:
        return
    if kind is not None:
        allowed = ", ".join(f"`{name}`" for name in sorted(tier.content_parts))
        raise bad_request(
            f"Content parts of type `{kind}` are not allowed for tier `{tier.name}` "
            f"(allowed: {allowed}).",
            param=ctx.endpoint.prompt_field,
            code="parameter_not_allowed",
        )


def _check_prompt_count(ctx: RequestContext) -> None:
    """A batched completions request may carry at most the tier's ``max_prompts`` prompts,
    an embeddings request at most its ``embeddings.max_inputs`` inputs."""
    assert ctx.client is not None
    tier = ctx.client.tier
    prompts = prompt_count(ctx.endpoint, ctx.body)
    if ctx.endpoint is Endpoint.EMBEDDINGS:
        field, most, what = "input", tier.embeddings.max_inputs, "inputs"
    else:
        field, most, what = "prompt", tier.max_prompts, "prompts"
    if prompts > most:
        raise bad_request(
            f"`{field}` batches {prompts} {what}; tier `{tier.name}` allows at most "
            f"{most} per request. Send them in several requests.",
            param=field,
            code="value_out_of_range",
        )


def _enforce_bound(
    ctx: RequestContext, field: str, bound: Bound, ceiling: float | None = None
) -> None:
    """Reject or clamp ``field`` outside ``bound``; a clamp from above lowers it to the
    bound's maximum, or to ``ceiling`` when given."""
    value = ctx.body.get(field)
    if value is None or isinstance(value, bool):
        return
    effective = math.inf if (field in _ALL_MEANS_UNBOUNDED and value == -1) else value
    if bound.max is not None and effective > bound.max:
        limit, side = bound.max, "above the maximum"
        clamp_to = bound.max if ceiling is None else ceiling
    elif bound.min is not None and effective < bound.min:
        limit, side = bound.min, "below the minimum"
        clamp_to = bound.min
    else:
        return
    tier = ctx.client.tier.name if ctx.client else "none"
    if bound.on_exceed == "reject":
        raise bad_request(
            f"`{field}` is {value}, {side} of {_show(limit)} allowed for tier `{tier}`.",
            param=field,
            code="value_out_of_range",
        )
    ctx.body[field] = int(clamp_to) if isinstance(value, int) else float(clamp_to)
    ctx.note("clamped", field)


def _apply_logit_bias_policy(ctx: RequestContext) -> None:
    assert ctx.client is not None
    policy = ctx.client.tier.logit_bias
    bias = ctx.body.get("logit_bias")
    if not bias:
        return
    if policy.mode == "strip":
        del ctx.body["logit_bias"]
        ctx.note("stripped", "logit_bias")
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
        ctx.note("clamped", "logit_bias")


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _show(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else str(limit)
