"""Transform the upstream's answer on its way back: logprob hardening, public model name and
usage accounting. Works on whole responses and on streamed chunks alike."""

from __future__ import annotations

from typing import Any

from guard_server.defences.keys import client_key, request_key
from guard_server.defences.logprobs import LogprobHardening
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext


def _take_usage(ctx: RequestContext, payload: dict[str, Any]) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict):
        ctx.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        ctx.completion_tokens = int(usage.get("completion_tokens") or 0)


def transform_response(ctx: RequestContext, body: dict[str, Any]) -> None:
    """Rewrite a whole (non-streaming) response in place."""
    body["model"] = ctx.model
    _take_usage(ctx, body)
    _harden_choices(ctx, body.get("choices"), streaming=False)
    if ctx.digit_map is not None:
        _mislead(ctx.digit_map, body.get("choices"))


def transform_chunk(ctx: RequestContext, chunk: dict[str, Any]) -> bool:
    """Rewrite one streamed chunk in place; return False to drop it."""
    if "usage" in chunk and not chunk.get("choices"):
        _take_usage(ctx, chunk)
        if not ctx.client_wants_usage:
            return False
    chunk["model"] = ctx.model
    _harden_choices(ctx, chunk.get("choices"), streaming=True)
    if ctx.digit_map is not None:
        _mislead(ctx.digit_map, chunk.get("choices"))
    return True


def carries_token(chunk: dict[str, Any]) -> bool:
    """Whether a chunk holds generated text (for time-to-first-token)."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def _harden_choices(ctx: RequestContext, choices: Any, *, streaming: bool) -> None:
    if not choices or not _hardening(ctx).active:
        return
    for choice in choices:
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


def _hardening(ctx: RequestContext) -> LogprobHardening:
    assert ctx.client is not None
    return ctx.hardening or ctx.client.tier.hardening


def _key(ctx: RequestContext) -> bytes:
    if ctx.logprob_key is None:
        assert ctx.client is not None
        material = ctx.body.get("messages" if ctx.endpoint is Endpoint.CHAT else "prompt")
        base = client_key(ctx.settings.secret, "logprob-noise", ctx.client.id)
        ctx.logprob_key = request_key(base, material)
    return ctx.logprob_key


def _harden_position(
    ctx: RequestContext, position: int, values: dict[str, float], sampled: str | None
) -> dict[str, float]:
    tokens = list(values)
    index = tokens.index(sampled) if sampled is not None else None
    hardened = _hardening(ctx).apply(_key(ctx), position, tokens, list(values.values()), index)
    return dict(zip(tokens, hardened, strict=True))


def _harden_chat(ctx: RequestContext, items: Any, start: int) -> int:
    count = 0
    for offset, item in enumerate(items):
        top = item.get("top_logprobs") or []
        values = {item["token"]: item["logprob"]}
        for entry in top:
            values.setdefault(entry["token"], entry["logprob"])
        hardened = _harden_position(ctx, start + offset, values, item["token"])
        item["logprob"] = hardened[item["token"]]
        for entry in top:
            entry["logprob"] = hardened[entry["token"]]
        count += 1
    return count


def _harden_completion(ctx: RequestContext, logprobs: dict[str, Any], start: int) -> int:
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
        hardened = _harden_position(ctx, start + offset, values, sampled_token)
        if value is not None:
            sampled[offset] = hardened[token]
        if top:
            tops[offset] = {t: hardened[t] for t in top}
    return len(tokens)


def _mislead(table: dict[int, str], choices: Any) -> None:
    """The misinformation decoy: remap digits in generated text and logprob tokens."""
    for choice in choices or ():
        if isinstance(choice.get("text"), str):
            choice["text"] = choice["text"].translate(table)
        for part in (choice.get("message"), choice.get("delta")):
            if part and isinstance(part.get("content"), str):
                part["content"] = part["content"].translate(table)
        logprobs = choice.get("logprobs")
        if not logprobs:
            continue
        if "content" in logprobs:
            for item in logprobs.get("content") or ():
                for entry in (item, *(item.get("top_logprobs") or ())):
                    entry["token"] = entry["token"].translate(table)
                    if entry.get("bytes") is not None:
                        entry["bytes"] = list(entry["token"].encode())
        else:
            tokens = logprobs.get("tokens") or []
            logprobs["tokens"] = [token.translate(table) for token in tokens]
            logprobs["top_logprobs"] = [
                {t.translate(table): v for t, v in top.items()} if top else top
                for top in logprobs.get("top_logprobs") or []
            ]
