"""Plan: turn the client's risk into an action: pass, tighten, perturb, decoy or block.

``tighten`` is applied by the admission stage (smaller limits); this stage applies the rest:
stronger logprob hardening from ``perturb`` on, decoy answers from ``decoy`` on, and a 403
for ``block``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from guard_server.defences.decoy import digit_map
from guard_server.detection.scoring import ACTIONS
from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.policy import wants_logprobs

_RANK = {action: rank for rank, action in enumerate(ACTIONS)}
_CAMPAIGN_SIGNAL = 0.2


class Planner:
    """The plan stage; also keeps this replica's view of flagged clients for the gauges."""

    def __init__(self, metrics: GuardMetrics, max_tracked: int = 100_000) -> None:
        self.metrics = metrics
        self._actions: OrderedDict[str, str] = OrderedDict()
        self._campaign_fingerprints: OrderedDict[str, None] = OrderedDict()
        self._max_tracked = max_tracked

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.client is not None
        assessment = ctx.assessment
        action = assessment.action if assessment else "pass"
        ctx.action = action
        self._track(ctx.client.id, action)
        if assessment and assessment.contributions.get("campaign", 0) >= _CAMPAIGN_SIGNAL:
            self._note_campaign(ctx.fingerprint)
        detection = ctx.client.tier.detection
        if action == "block":
            raise GuardError(
                403,
                "This API key is suspended. Contact the API operator.",
                type="permission_error",
                code="access_suspended",
            )
        if _RANK[action] >= _RANK["perturb"]:
            self._perturb_logprobs(ctx)
        if action == "decoy":
            ctx.decoy_source = detection.decoy.source
            if detection.decoy.source == "model":
                ctx.upstream_model = detection.decoy.model
            elif detection.decoy.source == "misinformation":
                ctx.digit_map = digit_map(ctx.settings.secret, ctx.client.id)
            self.metrics.decoys.labels(detection.decoy.source).inc()

    def _perturb_logprobs(self, ctx: RequestContext) -> None:
        assert ctx.client is not None
        tier = ctx.client.tier
        perturb = tier.detection.perturb
        if not wants_logprobs(ctx):
            return
        count_field = "top_logprobs" if ctx.endpoint is Endpoint.CHAT else "logprobs"
        if perturb.max_top == 0:
            ctx.body.pop("logprobs", None)
            ctx.body.pop("top_logprobs", None)
        elif (ctx.body.get(count_field) or 0) > perturb.max_top:
            ctx.body[count_field] = perturb.max_top
        base = tier.hardening
        ctx.hardening = replace(base, noise_scale=max(base.noise_scale, perturb.noise_scale))

    def _track(self, client_id: str, action: str) -> None:
        previous = self._actions.pop(client_id, "pass")
        if previous != "pass":
            self.metrics.flagged_clients.labels(previous).dec()
        if action != "pass":
            self._actions[client_id] = action
            self.metrics.flagged_clients.labels(action).inc()
            if len(self._actions) > self._max_tracked:
                _, dropped = self._actions.popitem(last=False)
                self.metrics.flagged_clients.labels(dropped).dec()

    def _note_campaign(self, fingerprint: str) -> None:
        if fingerprint in self._campaign_fingerprints:
            return
        self._campaign_fingerprints[fingerprint] = None
        if len(self._campaign_fingerprints) > self._max_tracked:
            self._campaign_fingerprints.popitem(last=False)
        self.metrics.campaigns.inc()
