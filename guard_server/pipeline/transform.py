"""Transform the upstream's answer on its way back: public model name, usage accounting."""

from __future__ import annotations

from typing import Any

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


def transform_chunk(ctx: RequestContext, chunk: dict[str, Any]) -> bool:
    """Rewrite one streamed chunk in place; return False to drop it."""
    if "usage" in chunk and not chunk.get("choices"):
        _take_usage(ctx, chunk)
        if not ctx.client_wants_usage:
            return False
    chunk["model"] = ctx.model
    return True


def carries_token(chunk: dict[str, Any]) -> bool:
    """Whether a chunk holds generated text (for time-to-first-token)."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
