"""The logprob channel, both halves: how many values a request may ask for (the tier's cap,
then the plan's), and the hardening of the values that come back (keyed noise, order,
normalization, grid), on whole responses and streamed chunks alike."""

from __future__ import annotations

from typing import Any

from guard_server.defences.keys import client_key, request_key
from guard_server.errors import bad_request
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext


def wants_logprobs(ctx: RequestContext) -> bool:
    """Whether the request (as rewritten so far) asks for logprob values."""
    value = ctx.body.get("logprobs")
    if ctx.endpoint is Endpoint.CHAT:
        return value is True
    return value is not None


def _count_field(ctx: RequestContext) -> str:
    return "top_logprobs" if ctx.endpoint is Endpoint.CHAT else "logprobs"


def _drop_logprobs(body: dict[str, Any]) -> None:
    body.pop("logprobs", None)
    body.pop("top_logprobs", None)


def check_tier_cap(ctx: RequestContext) -> None:
    """The tier policy's half: cap ``top_logprobs`` (chat) / ``logprobs`` (completions) at the
    tier's ``max_top`` (0: no logprobs at all), clamping or rejecting as the tier says, and
    refuse ``echo`` with logprobs unless the tier allows it."""
    assert ctx.client is not None
    policy = ctx.client.tier.logprobs
    body = ctx.body
    count_field = _count_field(ctx)
    count = body.get(count_field)
    if policy.max_top == 0 and wants_logprobs(ctx):
        if policy.on_exceed == "reject":
            raise bad_request(
                f"Logprobs are not available to tier `{ctx.client.tier.name}`.",
                param="logprobs",
                code="value_out_of_range",
            )
        _drop_logprobs(body)
        ctx.note("stripped", "logprobs")
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
        ctx.note("clamped", count_field)
    if body.get("echo") and wants_logprobs(ctx) and not policy.allow_echo:
        raise bad_request(
            "`echo` together with logprobs is not allowed for this tier.",
            param="echo",
            code="parameter_not_allowed",
        )


class LogprobChannel:
    """The tier's logprob cap on the way up; hardened values on the way back.

    A flagged client (``perturb`` and above) asks vLLM for exactly what any client of its
    tier would, and gets as many values back, sorted the same way: its plan hardens them
    harder and lets only the first few keep their rank (``LogprobHardening.ranked``), so
    neither the count nor the ``x-guard-policy`` note tells it apart.
    """

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """Lower the count to the plan's cap (the tier's), and note hardening."""
        if not wants_logprobs(ctx):
            return
        plan = ctx.plan
        assert plan is not None and ctx.client is not None
        count_field = _count_field(ctx)
        if plan.logprob_cap == 0:
            _drop_logprobs(body)
            ctx.note("stripped", "logprobs")
            return
        if (body.get(count_field) or 0) > plan.logprob_cap:
            body[count_field] = plan.logprob_cap
            ctx.note("clamped", count_field)
        if ctx.client.tier.hardening.active:  # the tier's, never the plan's: that would tell
            ctx.note("hardened", "logprobs")

    def response(self, ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
        """Harden every returned value in place."""
        assert ctx.plan is not None
        if not ctx.plan.hardening.active:
            return
        for choice in payload.get("choices") or ():
            logprobs = choice.get("logprobs")
            if not logprobs:
                continue
            index = choice.get("index", 0)
            start = ctx.logprob_positions.get(index, 0) if streaming else 0
            if ctx.endpoint is Endpoint.CHAT:
                count = _harden_chat(ctx, logprobs.get("content") or (), start)
            else:
                count = _harden_completion(ctx, logprobs, start)
            ctx.logprob_positions[index] = start + count


def _key(ctx: RequestContext) -> bytes:
    if ctx.logprob_key is None:
        assert ctx.client is not None
        material = ctx.body.get("messages" if ctx.endpoint is Endpoint.CHAT else "prompt")
        base = client_key(ctx.settings.secret, "logprob-noise", ctx.client.id)
        ctx.logprob_key = request_key(base, material)
    return ctx.logprob_key


def _listed_chat(item: dict[str, Any], top: list[dict[str, Any]]) -> bool:
    """Whether a chat position's sampled token is among its top ones."""
    return any(entry["token"] == item["token"] for entry in top)


def _listed_completion(ctx: RequestContext, token: str, top: dict[str, float] | None) -> bool:
    """Whether a completion position's sampled token is among the top ones asked for: vLLM
    adds it after them (one entry more) when it is not."""
    return not top or len(top) <= (ctx.body.get("logprobs") or 0) or token != list(top)[-1]


def _harden_position(
    ctx: RequestContext,
    position: int,
    values: dict[str, float],
    sampled: str | None,
    sampled_listed: bool,
) -> dict[str, float]:
    """One position's hardened values; with a ``ranked`` plan, in the order to list them.
    ``sampled_listed``: whether the sampled token is among the top ones asked for."""
    assert ctx.plan is not None
    hardening = ctx.plan.hardening
    tokens = list(values)
    raw = list(values.values())
    index = tokens.index(sampled) if sampled is not None else None
    if hardening.ranked is None:
        hardened = hardening.apply(_key(ctx), position, tokens, raw, index)
        return dict(zip(tokens, hardened, strict=True))
    pinned = None if sampled_listed else index
    raw, order = hardening.rerank(_key(ctx), position, tokens, raw, pinned)
    hardened = hardening.apply(_key(ctx), position, tokens, raw, index)
    place = {i: rank for rank, i in enumerate(order)}
    listed = sorted(range(len(tokens)), key=lambda i: (-hardened[i], place[i]))
    return {tokens[i]: hardened[i] for i in listed}


def _harden_chat(ctx: RequestContext, items: Any, start: int) -> int:
    assert ctx.plan is not None
    ranked = ctx.plan.hardening.ranked is not None
    count = 0
    for offset, item in enumerate(items):
        top = item.get("top_logprobs") or []
        values = {item["token"]: item["logprob"]}
        for entry in top:
            values.setdefault(entry["token"], entry["logprob"])
        listed = not ranked or _listed_chat(item, top)
        hardened = _harden_position(ctx, start + offset, values, item["token"], listed)
        item["logprob"] = hardened[item["token"]]
        for entry in top:
            entry["logprob"] = hardened[entry["token"]]
        if top and ranked:
            order = list(hardened)
            top.sort(key=lambda entry: order.index(entry["token"]))
        count += 1
    return count


def _harden_completion(ctx: RequestContext, logprobs: dict[str, Any], start: int) -> int:
    assert ctx.plan is not None
    ranked = ctx.plan.hardening.ranked is not None
    tokens = logprobs.get("tokens") or []
    sampled = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    for offset, token in enumerate(tokens):
        top = tops[offset] if offset < len(tops) else None
        value = sampled[offset] if offset < len(sampled) else None
        values = dict(top) if top else {}
        if value is not None:
            values.setdefault(token, value)
        if not values:
            continue
        sampled_token = token if value is not None else None
        listed = not ranked or _listed_completion(ctx, token, top)
        hardened = _harden_position(ctx, start + offset, values, sampled_token, listed)
        if value is not None:
            sampled[offset] = hardened[token]
        if top:
            tops[offset] = {t: v for t, v in hardened.items() if t in top}
    return len(tokens)
