"""Rewrite the request for the upstream: every defence's request half, the served model name
and forced usage reporting."""

from __future__ import annotations

import orjson

from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.defences import DEFENCES


def rewrite_for_upstream(ctx: RequestContext, served_model: str, guard_plugin: bool) -> bytes:
    """Serialize the body as the upstream should see it.

    Streams always ask vLLM for usage so the guard can count tokens; the usage chunk is
    dropped again on the way back if the client did not ask for it. As in vLLM, any
    ``stream_options`` object asks for usage unless it sets ``include_usage`` to false.
    """
    body = ctx.body
    for defence in DEFENCES:
        defence.request(ctx, body, guard_plugin)
    body["model"] = served_model
    if ctx.endpoint is Endpoint.RESPONSES:
        # vLLM keeps nothing between requests: no stored response to continue or poll, so no
        # turn can reach the model unseen by the guard (README, "The Responses API").
        body["store"] = False
        return orjson.dumps(body)
    if ctx.stream:
        options = body.get("stream_options")
        ctx.client_wants_usage = options is not None and bool(options.get("include_usage", True))
        body["stream_options"] = {**(options or {}), "include_usage": True}
    return orjson.dumps(body)
