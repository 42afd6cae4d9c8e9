"""Rewrite the request for the upstream: its model name and forced usage reporting."""

from __future__ import annotations

import orjson

from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plugin_args import plugin_args


def rewrite_for_upstream(ctx: RequestContext, served_model: str, guard_plugin: bool) -> bytes:
    """Serialize the body as the upstream should see it.

    With the guard's plugin upstream, the plugin's parameters travel in ``vllm_xargs``.
    Without it, a ``perturbed`` decoy falls back to sampling at temperature 2.

    Streams always ask vLLM for usage so the guard can count tokens; the usage chunk is
    dropped again on the way back if the client did not ask for it. As in vLLM, any
    ``stream_options`` object asks for usage unless it sets ``include_usage`` to false.
    """
    body = ctx.body
    if guard_plugin:
        args = plugin_args(ctx)
        if args:
            body["vllm_xargs"] = args
    elif ctx.decoy_source == "perturbed":
        body["temperature"] = 2.0
    body["model"] = served_model
    if ctx.stream:
        options = body.get("stream_options")
        ctx.client_wants_usage = options is not None and bool(options.get("include_usage", True))
        body["stream_options"] = {**(options or {}), "include_usage": True}
    return orjson.dumps(body)
