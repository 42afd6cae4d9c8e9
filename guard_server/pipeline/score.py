"""Score: fold the request into the client's risk profile and assess the client."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from guard_server.config.loader import Client
from guard_server.detection.end_users import assess_key, score_with_end_user
from guard_server.detection.features import RequestFeatures, extract_features
from guard_server.detection.profile import ClientProfile
from guard_server.detection.scoring import Assessment
from guard_server.metrics import GuardMetrics
from guard_server.pipeline.context import RequestContext
from guard_server.state.base import StateStore, StateUnavailable

log = logging.getLogger(__name__)

FRESH_REQUESTS = 200
"""A client's first requests are all assessed: its shares still move fast."""
REASSESS_EVERY = 4
"""After that, one request in this many is assessed; the others reuse the last assessment."""
REMEMBERED_CLIENTS = 16_384
"""Clients whose last assessment this process keeps (least recently seen forgotten first)."""


class RiskScorer:
    """The scoring stage. If the state store is down, requests pass unscored.

    Every request is counted into the shared profiles. Assessing them is amortized: an
    established profile moves by well under 0.01 of score per request (decayed shares with
    alpha 0.02, distinct counts ramping over 800 prompts), against 0.05 between action
    thresholds, so an action follows the score at most ``REASSESS_EVERY - 1`` requests late.
    A request naming an end user (``safety_identifier`` / ``user``) is always assessed, in
    the key's scope and the end user's (:mod:`guard_server.detection.end_users`).
    """

    def __init__(self, store: StateStore, metrics: GuardMetrics) -> None:
        self.store = store
        self.metrics = metrics
        # client id -> [its last assessment, how many more requests may reuse it]
        self._last: OrderedDict[str, list] = OrderedDict()

    async def __call__(self, ctx: RequestContext) -> None:
        assert ctx.client is not None
        tier = ctx.client.tier
        if not tier.detection.enabled:
            return
        assert ctx.canonical is not None
        features = extract_features(ctx.canonical, max(1, tier.logprobs.max_top))
        ctx.features = features
        ctx.scored_at = time.time()
        ctx.fingerprint = features.fingerprint
        client_id = ctx.client.id
        try:
            last = self._last.get(client_id)
            if ctx.end_user is not None and tier.detection.end_users.enabled:
                ctx.assessment, ctx.end_user_assessment = await score_with_end_user(
                    self.store, client_id, ctx.end_user, features, tier.detection
                )
                self._remember(client_id, ctx.assessment, None)
            elif last is not None and last[1] > 0:
                await self.store.count(client_id, features)
                last[1] -= 1
                ctx.assessment = last[0]
            else:
                ctx.assessment = await self._assess(ctx.client, features)
        except StateUnavailable as exc:
            self.metrics.state_up.set(0)
            self.metrics.state_errors.inc()
            log.warning("risk state unavailable, request not scored: %s", exc)
            return
        self.metrics.child(self.metrics.risk_score, tier.name).observe(ctx.assessment.score)

    def forget(self, client_id: str) -> None:
        """Drop the client's last assessment (its profile was reset): assess it afresh."""
        self._last.pop(client_id, None)

    async def _assess(self, client: Client, features: RequestFeatures) -> Assessment:
        profile, campaign = await self.store.observe(client.id, features)
        assessment = assess_key(client.tier.detection, profile, campaign)
        self._remember(client.id, assessment, profile)
        return assessment

    def _remember(
        self, client_id: str, assessment: Assessment, profile: ClientProfile | None
    ) -> None:
        """Keep the client's last assessment for the next requests to reuse (``profile``:
        the profile it came from; None: reassess at the next request without an end user)."""
        fresh = profile is None or profile.total <= FRESH_REQUESTS
        self._last[client_id] = [assessment, 0 if fresh else REASSESS_EVERY - 1]
        self._last.move_to_end(client_id)
        if len(self._last) > REMEMBERED_CLIENTS:
            self._last.popitem(last=False)
