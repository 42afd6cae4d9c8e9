"""Canonicalize: what vLLM will see of the request, taken once the tier policy has settled
it and before anything keys, counts or scores it (``guard_server.canonical``)."""

from __future__ import annotations

from guard_server.canonical import canonical_input
from guard_server.pipeline.context import RequestContext


async def canonicalize(ctx: RequestContext) -> None:
    """Set ``ctx.canonical``; every later stage derives its keys and counts from it."""
    ctx.canonical = canonical_input(ctx.endpoint, ctx.body)
