"""The decoy, both halves: what a decoyed request becomes on the way up (another model, or
hotter sampling) and what its answer becomes on the way back (the misinformation map).

The plan decides whether a request is decoyed (:func:`plan_decoy`); this module is the only
one that knows what each decoy source does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard_server.config.loader import Client
from guard_server.defences.decoy import digit_map
from guard_server.pipeline.context import RequestContext

_HOT_TEMPERATURE = 2.0
"""The ``perturbed`` decoy's sampling temperature when the upstream runs no guard plugin."""


@dataclass(frozen=True, slots=True)
class DecoyPlan:
    """How one request is decoyed."""

    source: str  # misinformation, model or perturbed
    model: str | None = None  # source `model`: the upstream model that answers instead
    sigma: float = 0.0  # source `perturbed`: the plugin's sampling-noise strength
    digits: dict[int, str] | None = None  # source `misinformation`: the digit map


def plan_decoy(secret: bytes, client: Client) -> DecoyPlan:
    """The decoy the client's tier configures."""
    decoy = client.tier.detection.decoy
    if decoy.source == "model":
        return DecoyPlan("model", model=decoy.model)
    if decoy.source == "perturbed":
        return DecoyPlan("perturbed", sigma=decoy.perturbed_sigma)
    return DecoyPlan("misinformation", digits=digit_map(secret, client.id))


class Decoy:
    """The decoy defence: acts only on requests whose plan carries a decoy."""

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """Without the guard's plugin upstream, a ``perturbed`` decoy samples hot instead."""
        assert ctx.plan is not None
        decoy = ctx.plan.decoy
        if decoy is not None and decoy.source == "perturbed" and not guard_plugin:
            body["temperature"] = _HOT_TEMPERATURE

    def response(self, ctx: RequestContext, choices: list[Any], streaming: bool) -> None:
        """The misinformation decoy remaps digits in generated text and logprob tokens."""
        assert ctx.plan is not None
        decoy = ctx.plan.decoy
        if decoy is not None and decoy.digits is not None:
            _mislead(decoy.digits, choices)


def _mislead(table: dict[int, str], choices: list[Any]) -> None:
    for choice in choices:
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
