"""The logprob channel, both halves: how many values a request may ask for (the tier's cap,
then the plan's), whether it may ask for them under constrained decoding, and the hardening
of the values that come back (keyed noise, order, normalization, grid) on whole responses
and streamed chunks alike, prompt logprobs included.

Each prompt's values are hardened under a key derived from the client and that prompt's
canonical identity alone (``guard_server.canonical``): bytes the model ignores, or the other
prompts batched with it, change nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from guard_server.canonical import logprob_count
from guard_server.defences.keys import client_key, identity_key
from guard_server.defences.logprob_batch import Positions, apply_many, listed_order, rerank_many
from guard_server.errors import bad_request
from guard_server.openai_fields import LOGPROBS_INCLUDE, Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.responses_output import pieces

_PROMPT_POSITIONS = "prompt-logprob-noise"  # the key purpose for prompt logprobs
_GENERATED_POSITIONS = "logprob-noise"
BATCH_FROM = 16
"""From this many positions on (a whole response), they are hardened at once with numpy;
below (a streamed chunk), one at a time, where numpy's fixed cost would dominate
(``benchmarks/logprob_hardening.py``)."""


def wants_logprobs(ctx: RequestContext) -> bool:
    """Whether the request (as rewritten so far) asks for logprob values."""
    return logprob_count(ctx.endpoint, ctx.body) is not None


def constraint_of(endpoint: Endpoint, body: dict[str, Any]) -> str | None:
    """The field that constrains decoding, if any: vLLM then renormalises the returned
    logprobs over the tokens the constraint allows (its grammar mask comes before them).

    Checked against vLLM 0.32: every ``structured_outputs`` kind; a ``response_format`` other
    than ``text`` (json_object, json_schema, structural_tag); ``tools`` unless ``tool_choice``
    is ``none`` (named and ``required`` choices become a JSON-schema grammar, and with a tool
    parser ``auto`` adds a structural tag); ``allowed_token_ids`` (it forces the sampled token
    into a chosen set, as a large ``logit_bias`` would). On the Responses API: ``text.format``
    other than ``text`` (vLLM makes it a structured output), and ``tools`` as on chat.
    """
    if body.get("structured_outputs") is not None:
        return "structured_outputs"
    if endpoint is Endpoint.RESPONSES:
        text_format = (body.get("text") or {}).get("format")
        if isinstance(text_format, dict) and text_format.get("type", "text") != "text":
            return "text.format"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        return "response_format"
    if endpoint.conversational and body.get("tools") and body.get("tool_choice") != "none":
        return "tool_choice" if body.get("tool_choice") is not None else "tools"
    if body.get("allowed_token_ids"):
        return "allowed_token_ids"
    return None


def _count_field(ctx: RequestContext) -> str:
    return "top_logprobs" if ctx.endpoint.conversational else "logprobs"


def _drop_logprobs(body: dict[str, Any]) -> None:
    body.pop("logprobs", None)
    body.pop("top_logprobs", None)
    include = body.get("include")
    if include and LOGPROBS_INCLUDE in include:
        body["include"] = [value for value in include if value != LOGPROBS_INCLUDE]


def check_tier_cap(ctx: RequestContext) -> None:
    """The tier policy's half: cap ``top_logprobs`` (chat) / ``logprobs`` (completions) at the
    tier's ``max_top`` (0: no logprobs at all), clamping or rejecting as the tier says; refuse
    ``echo`` with logprobs unless the tier allows it; and refuse or drop logprobs under
    constrained decoding unless the tier opts in (``with_constraints``)."""
    assert ctx.client is not None
    tier = ctx.client.tier
    policy = tier.logprobs
    body = ctx.body
    count_field = _count_field(ctx)
    count = body.get(count_field)
    if policy.max_top == 0 and wants_logprobs(ctx):
        if policy.on_exceed == "reject":
            raise bad_request(
                f"Logprobs are not available to tier `{tier.name}`.",
                param="include" if ctx.endpoint is Endpoint.RESPONSES else "logprobs",
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
                f"allowed for tier `{tier.name}`.",
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
    constraint = constraint_of(ctx.endpoint, body)
    if constraint is None or not wants_logprobs(ctx) or policy.with_constraints == "allow":
        return
    if policy.with_constraints == "reject":
        raise bad_request(
            f"Logprobs cannot be combined with `{constraint}` for tier `{tier.name}`: under "
            "constrained decoding the returned values are renormalised over the tokens the "
            "constraint allows. Drop the logprobs or the constraint.",
            param=constraint,
            code="parameter_not_allowed",
        )
    _drop_logprobs(body)
    ctx.note("stripped", "logprobs")


class LogprobChannel:
    """The tier's logprob cap on the way up; hardened values on the way back.

    A flagged client (``perturb`` and above) asks vLLM for exactly what any client of its
    tier would, and gets as many values back, sorted the same way: its plan hardens them
    harder and lets only the first few keep their rank (``LogprobHardening.ranked``), so
    neither the count nor the ``x-guard-policy`` note tells it apart.
    """

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """Lower the count to the plan's cap (the tier's), and note hardening."""
        plan = ctx.plan
        assert plan is not None and ctx.client is not None
        hardened = ctx.client.tier.hardening.active  # the tier's, never the plan's: that would tell
        if body.get("prompt_logprobs") is not None and hardened:
            ctx.note("hardened", "prompt_logprobs")
        if not wants_logprobs(ctx):
            return
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
        assert ctx.plan is not None and ctx.canonical is not None
        if not ctx.plan.hardening.active:
            return
        if ctx.endpoint is Endpoint.RESPONSES:
            self._harden_responses(ctx, payload, streaming)
            return
        n = ctx.canonical.n
        for choice in payload.get("choices") or ():
            index = choice.get("index", 0)
            prompt = index // n if ctx.endpoint is Endpoint.COMPLETIONS else 0
            prompt_logprobs = choice.get("prompt_logprobs")
            if prompt_logprobs:
                harden_prompt_logprobs(ctx, prompt, prompt_logprobs)
            logprobs = choice.get("logprobs")
            if not logprobs:
                continue
            start = ctx.logprob_positions.get(index, 0) if streaming else 0
            key = _key(ctx, _GENERATED_POSITIONS, prompt)
            if ctx.endpoint is Endpoint.CHAT:
                count = _harden_chat(ctx, key, logprobs.get("content") or (), start)
            else:
                count = _harden_completion(ctx, key, logprobs, start)
            ctx.logprob_positions[index] = start + count

    @staticmethod
    def _harden_responses(ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
        """The output text's logprobs: a stream's deltas run on from the ones before; every
        full list (a done event, the final response) starts over and so hardens alike."""
        key = _key(ctx, _GENERATED_POSITIONS, 0)
        for piece in pieces(payload):
            if piece.logprobs is None:
                continue
            slot = piece.slot if streaming else None
            start = ctx.logprob_positions.get(slot, 0) if slot is not None else 0
            count = _harden_chat(ctx, key, piece.logprobs, start)
            if slot is not None:
                ctx.logprob_positions[slot] = start + count


def _key(ctx: RequestContext, purpose: str, prompt: int) -> bytes:
    """The hardening key of one prompt of the request (cached per request)."""
    slot = prompt if purpose == _GENERATED_POSITIONS else -1 - prompt
    key = ctx.logprob_keys.get(slot)
    if key is None:
        assert ctx.client is not None and ctx.canonical is not None
        base = client_key(ctx.settings.secret, purpose, ctx.client.id)
        key = ctx.logprob_keys[slot] = identity_key(base, ctx.canonical.identities[prompt])
    return key


def harden_prompt_logprobs(ctx: RequestContext, prompt: int, positions: list[Any]) -> None:
    """Harden vLLM's ``prompt_logprobs`` of one prompt in place: per position, a map of token
    id to ``{"logprob", "rank", "decoded_token"}``, the prompt's own token first."""
    assert ctx.plan is not None
    if not ctx.plan.hardening.active:
        return
    key = _key(ctx, _PROMPT_POSITIONS, prompt)
    hardening = ctx.plan.hardening
    filled = [(position, entries) for position, entries in enumerate(positions) if entries]
    tokens = [list(entries) for _, entries in filled]
    values = [[entry["logprob"] for entry in entries.values()] for _, entries in filled]
    if len(filled) < BATCH_FROM:
        hardened = [
            hardening.apply(key, position, row, row_values, 0)
            for (position, _), row, row_values in zip(filled, tokens, values, strict=True)
        ]
    else:
        batch = Positions.of([position for position, _ in filled], tokens, values)
        first = np.zeros(len(filled), dtype=np.intp)  # the prompt's own token
        hardened = apply_many(hardening, key, batch, first).tolist()
    for (_, entries), row, row_values in zip(filled, tokens, hardened, strict=True):
        for token, value in zip(row, row_values, strict=False):
            entries[token]["logprob"] = value


def _listed_chat(item: dict[str, Any], top: list[dict[str, Any]]) -> bool:
    """Whether a chat position's sampled token is among its top ones."""
    return any(entry["token"] == item["token"] for entry in top)


def _listed_completion(ctx: RequestContext, token: str, top: dict[str, float] | None) -> bool:
    """Whether a completion position's sampled token is among the top ones asked for: vLLM
    adds it after them (one entry more) when it is not."""
    return not top or len(top) <= (ctx.body.get("logprobs") or 0) or token != list(top)[-1]


def _harden_positions(
    ctx: RequestContext,
    key: bytes,
    positions: list[int],
    rows: list[dict[str, float]],
    sampled: list[str | None],
    sampled_listed: list[bool],
) -> list[dict[str, float]]:
    """Each position's hardened values; with a ``ranked`` plan, in the order to list them.
    ``sampled_listed``: per position, whether the sampled token is among the top ones asked
    for. Many positions (a whole response) are hardened at once, a few (a streamed chunk) one
    at a time: both give every position the same values."""
    if len(rows) < BATCH_FROM:
        return [
            _harden_position(ctx, key, *position)
            for position in zip(positions, rows, sampled, sampled_listed, strict=True)
        ]
    assert ctx.plan is not None
    hardening = ctx.plan.hardening
    tokens = [list(row) for row in rows]
    batch = Positions.of(positions, tokens, [list(row.values()) for row in rows])
    index = np.array(
        [-1 if s is None else row.index(s) for row, s in zip(tokens, sampled, strict=True)],
        dtype=np.intp,
    )
    if hardening.ranked is None:
        hardened = apply_many(hardening, key, batch, index).tolist()
        return [
            dict(zip(row, values, strict=False))
            for row, values in zip(tokens, hardened, strict=True)
        ]
    pinned = np.where(np.array(sampled_listed, dtype=bool), -1, index)
    reranked, order = rerank_many(hardening, key, batch, pinned)
    hardened_values = apply_many(hardening, key, batch.with_values(reranked), index)
    listing = listed_order(hardened_values, order, batch.present).tolist()
    return [
        {row[i]: values[i] for i in listed[: len(row)]}
        for row, values, listed in zip(tokens, hardened_values.tolist(), listing, strict=True)
    ]


def _harden_position(
    ctx: RequestContext,
    key: bytes,
    position: int,
    values: dict[str, float],
    sampled: str | None,
    sampled_listed: bool,
) -> dict[str, float]:
    """One position's hardened values; with a ``ranked`` plan, in the order to list them."""
    assert ctx.plan is not None
    hardening = ctx.plan.hardening
    tokens = list(values)
    raw = list(values.values())
    index = tokens.index(sampled) if sampled is not None else None
    if hardening.ranked is None:
        hardened = hardening.apply(key, position, tokens, raw, index)
        return dict(zip(tokens, hardened, strict=True))
    pinned = None if sampled_listed else index
    raw, order = hardening.rerank(key, position, tokens, raw, pinned)
    hardened = hardening.apply(key, position, tokens, raw, index)
    place = {i: rank for rank, i in enumerate(order)}
    listed = sorted(range(len(tokens)), key=lambda i: (-hardened[i], place[i]))
    return {tokens[i]: hardened[i] for i in listed}


def _harden_chat(ctx: RequestContext, key: bytes, items: Any, start: int) -> int:
    assert ctx.plan is not None
    ranked = ctx.plan.hardening.ranked is not None
    items = list(items)
    rows = []
    for item in items:
        values = {item["token"]: item["logprob"]}
        for entry in item.get("top_logprobs") or ():
            values.setdefault(entry["token"], entry["logprob"])
        rows.append(values)
    listed = [not ranked or _listed_chat(item, item.get("top_logprobs") or []) for item in items]
    positions = list(range(start, start + len(items)))
    sampled: list[str | None] = [item["token"] for item in items]
    hardened_rows = _harden_positions(ctx, key, positions, rows, sampled, listed)
    for item, hardened in zip(items, hardened_rows, strict=True):
        top = item.get("top_logprobs") or []
        item["logprob"] = hardened[item["token"]]
        for entry in top:
            entry["logprob"] = hardened[entry["token"]]
        if top and ranked:
            order = list(hardened)
            top.sort(key=lambda entry: order.index(entry["token"]))
    return len(items)


def _harden_completion(
    ctx: RequestContext, key: bytes, logprobs: dict[str, Any], start: int
) -> int:
    assert ctx.plan is not None
    ranked = ctx.plan.hardening.ranked is not None
    tokens = logprobs.get("tokens") or []
    sampled = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    offsets, rows, sampled_tokens, listed = [], [], [], []
    for offset, token in enumerate(tokens):
        top = tops[offset] if offset < len(tops) else None
        value = sampled[offset] if offset < len(sampled) else None
        values = dict(top) if top else {}
        if value is not None:
            values.setdefault(token, value)
        if not values:
            continue
        offsets.append(offset)
        rows.append(values)
        sampled_tokens.append(token if value is not None else None)
        listed.append(not ranked or _listed_completion(ctx, token, top))
    positions = [start + offset for offset in offsets]
    hardened_rows = _harden_positions(ctx, key, positions, rows, sampled_tokens, listed)
    for offset, sampled_token, hardened in zip(offsets, sampled_tokens, hardened_rows, strict=True):
        if sampled_token is not None:
            sampled[offset] = hardened[sampled_token]
        top = tops[offset] if offset < len(tops) else None
        if top:
            tops[offset] = {t: v for t, v in hardened.items() if t in top}
    return len(tokens)
