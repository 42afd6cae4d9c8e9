"""Transform the upstream's answer on its way back: the public model name, usage accounting
and every defence's response half. Works on whole responses and on streamed chunks alike."""

from __future__ import annotations

from typing import Any

from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.defences import DEFENCES
from guard_server.pipeline.logprob_channel import harden_prompt_logprobs


def _take_usage(ctx: RequestContext, payload: dict[str, Any]) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict):
        ctx.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        ctx.completion_tokens = int(usage.get("completion_tokens") or 0)


def _defend(ctx: RequestContext, choices: Any, streaming: bool) -> None:
    if choices:
        for defence in DEFENCES:
            defence.response(ctx, choices, streaming)


def transform_response(ctx: RequestContext, body: dict[str, Any]) -> None:
    """Rewrite a whole (non-streaming) response in place."""
    body["model"] = ctx.model
    _take_usage(ctx, body)
    if body.get("prompt_logprobs"):  # chat's, for the whole response (vLLM refuses it on streams)
        harden_prompt_logprobs(ctx, 0, body["prompt_logprobs"])
    _defend(ctx, body.get("choices"), streaming=False)


def transform_chunk(ctx: RequestContext, chunk: dict[str, Any]) -> bool:
    """Rewrite one streamed chunk in place; return False to drop it."""
    if "usage" in chunk and not chunk.get("choices"):
        _take_usage(ctx, chunk)
        if not ctx.client_wants_usage:
            return False
    chunk["model"] = ctx.model
    _defend(ctx, chunk.get("choices"), streaming=True)
    return True


def carries_token(chunk: dict[str, Any]) -> bool:
    """Whether a chunk holds generated text (for time-to-first-token)."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
