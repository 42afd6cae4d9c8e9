"""Score: fold the request into the client's risk profile and assess the client."""

from __future__ import annotations

import logging

from guard_server.detection.features import extract_features
from guard_server.detection.scoring import assess
from guard_server.metrics import GuardMetrics
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.policy import wants_logprobs
from guard_server.state.base import StateStore, StateUnavailable

log = logging.getLogger(__name__)


class RiskScorer:
    """The scoring stage. If the state store is down, requests pass unscored."""

    def __init__(self, store: StateStore, metrics: GuardMetrics) -> None:
        self.store = store
        self.metrics = metrics

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.client is not None
        tier = ctx.client.tier
        if not tier.detection.enabled:
            return
        features = extract_features(
            ctx.endpoint, ctx.body, wants_logprobs(ctx), max(1, tier.logprobs.max_top)
        )
        try:
            profile, campaign = await self.store.observe(ctx.client.id, features)
        except StateUnavailable as exc:
            self.metrics.state_up.set(0)
            self.metrics.state_errors.inc()
            log.warning("risk state unavailable, request not scored: %s", exc)
            return
        ctx.assessment = assess(profile, campaign, tier.detection.thresholds.model_dump())
        ctx.fingerprint = features.fingerprint
        self.metrics.child(self.metrics.risk_score, tier.name).observe(ctx.assessment.score)
