"""Canonicalize: what vLLM will see of the request, taken once the tier policy has settled
it and before anything keys, counts or scores it (``guard_server.canonical``). A Responses
request's is that of the chat request vLLM renders it into (``guard_server.responses_input``):
the same conversation keys and counts alike through either endpoint."""

from __future__ import annotations

from guard_server.canonical import canonical_input
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.responses_input import chat_view


async def canonicalize(ctx: RequestContext) -> None:
    """Set ``ctx.canonical``; every later stage derives its keys and counts from it."""
    if ctx.endpoint is Endpoint.RESPONSES:
        ctx.canonical = canonical_input(Endpoint.CHAT, chat_view(ctx.body))
    else:
        ctx.canonical = canonical_input(ctx.endpoint, ctx.body)
