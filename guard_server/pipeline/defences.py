"""The defences, in the order they act. Each keeps its two halves together, like a mitmproxy
addon: ``request`` rewrites the body on its way to vLLM (run by the rewrite stage) and
``response`` rewrites the answer on its way back (run by the transform, once per whole
answer or streamed chunk: its ``choices``, and ``prompt_logprobs`` where vLLM puts them at
the top). Both read the request's plan; neither changes it."""

from __future__ import annotations

from typing import Any, Protocol

from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.decoy import Decoy
from guard_server.pipeline.logprob_channel import LogprobChannel
from guard_server.pipeline.sampling import SamplingControls
from guard_server.pipeline.seed import SeedPolicy


class Defence(Protocol):
    """One defence's request half and response half."""

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """Rewrite ``body`` (what vLLM will get) in place."""

    def response(self, ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
        """Rewrite the answer (a whole response or one streamed chunk) in place."""


DEFENCES: tuple[Defence, ...] = (LogprobChannel(), SeedPolicy(), SamplingControls(), Decoy())
"""Request halves run in this order; so do response halves (hardening sees the real tokens
before the decoy remaps them)."""
