"""The seed policy: pass a client's ``seed``, strip it, or re-key it so that a fixed seed
no longer lets a client resample one distribution under controlled changes."""

from __future__ import annotations

from typing import Any

from guard_server.defences.keys import rekeyed_seed
from guard_server.pipeline.context import RequestContext


class SeedPolicy:
    """The tier's ``seed`` mode, applied to the request on its way up."""

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """Strip or re-key the seed, as the tier says."""
        assert ctx.client is not None
        mode = ctx.client.tier.seed
        seed = body.get("seed")
        if seed is None or mode == "allow":
            return
        if mode == "strip":
            del body["seed"]
            ctx.note("stripped", "seed")
            return
        assert ctx.canonical is not None
        body["seed"] = rekeyed_seed(ctx.settings.secret, ctx.client.id, ctx.canonical.digest)
        ctx.note("rekeyed", "seed")

    def response(self, ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
        """Nothing: the answer is what the re-keyed seed sampled."""
