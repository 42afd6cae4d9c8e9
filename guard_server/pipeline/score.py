"""Score: fold the request into the client's risk profile and assess the client."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from guard_server.config.loader import Client
from guard_server.detection.end_users import assess_key, score_with_end_user
from guard_server.detection.features import RequestFeatures, extract_features
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import Assessment
from guard_server.metrics import GuardMetrics
from guard_server.pipeline.context import RequestContext
from guard_server.state.base import AdmitRequest, SpeculativeStore, StateStore, StateUnavailable

log = logging.getLogger(__name__)

FRESH_REQUESTS = 200
"""A client's first requests are all assessed: its shares still move fast."""
REASSESS_EVERY = 4
"""After that, one request in this many is assessed; the others reuse the last assessment."""
REMEMBERED_CLIENTS = 16_384
"""Clients whose last assessment this process keeps (least recently seen forgotten first)."""

Speculate = Callable[[RequestContext, Assessment | None], AdmitRequest | None]
"""The admission a request will need if it is assessed as given (None: none)."""


class RiskScorer:
    """The scoring stage. If the state store is down, requests pass unscored.

    Every request is counted into the shared profiles. Assessing them is amortized: an
    established profile moves by well under 0.01 of score per request (decayed shares with
    alpha 0.02, distinct counts ramping over 800 prompts), against 0.05 between action
    thresholds, so an action follows the score at most ``REASSESS_EVERY - 1`` requests late.

    With a :class:`SpeculativeStore` and ``speculate``, the request's admission is taken in
    the same round trip as its observation, under the limits its last assessment implies
    (``ctx.speculation``; the admission stage confirms or corrects it).

    A request naming an end user (``safety_identifier`` / ``user``) is always assessed, in
    the key's scope and the end user's (and, for a new end user, its newcomers' scope:
    :mod:`guard_server.detection.end_users`), and admitted after its plan (its limits may
    be a bucket of the end user's own).
    """

    def __init__(
        self, store: StateStore, metrics: GuardMetrics, speculate: Speculate | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._speculative = speculate if isinstance(store, SpeculativeStore) else None
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
        last = self._last.get(client_id)
        reuse = last is not None and last[1] > 0
        try:
            if ctx.end_user is not None and tier.detection.end_users.enabled:
                scores = await score_with_end_user(
                    self.store, client_id, ctx.end_user, features, tier.detection
                )
                ctx.assessment, ctx.end_user_assessment = scores.key, scores.own
                ctx.newcomers_assessment, ctx.newcomers_scope = (
                    scores.newcomers,
                    scores.newcomers_scope,
                )
                self._remember(client_id, ctx.assessment, None)
                self.metrics.child(self.metrics.risk_score, tier.name).observe(ctx.assessment.score)
                return
            if self._speculative is not None:
                predicted = last[0] if last is not None else None
                profiles = await self._observe_admit(ctx, features, predicted, reuse)
            elif reuse:
                await self.store.count(client_id, features)
            else:
                profiles = await self.store.observe(client_id, features)
        except StateUnavailable as exc:
            self.metrics.state_up.set(0)
            self.metrics.state_errors.inc()
            log.warning("risk state unavailable, request not scored: %s", exc)
            return
        if reuse:
            assert last is not None
            last[1] -= 1
            ctx.assessment = last[0]
        else:
            ctx.assessment = self._assess(ctx.client, *profiles)
        self.metrics.child(self.metrics.risk_score, tier.name).observe(ctx.assessment.score)

    def forget(self, client_id: str) -> None:
        """Drop the client's last assessment (its profile was reset): assess it afresh."""
        self._last.pop(client_id, None)

    async def _observe_admit(
        self,
        ctx: RequestContext,
        features: RequestFeatures,
        last: Assessment | None,
        reuse: bool,
    ) -> tuple[ClientProfile, CampaignProfile]:
        """Observe the request and take its admission as ``last`` implies, in one call."""
        assert ctx.client is not None and self._speculative is not None
        store = self.store
        assert isinstance(store, SpeculativeStore)
        request = self._speculative(ctx, last)
        ctx.lost_speculation = request  # until the call answers
        profile, campaign, admission = await store.observe_admit(
            ctx.client.id, features, request, want=not reuse
        )
        ctx.lost_speculation = None
        ctx.speculation = (request, admission)
        return profile, campaign  # type: ignore[return-value]  # None only if reused

    def _assess(
        self, client: Client, profile: ClientProfile, campaign: CampaignProfile
    ) -> Assessment:
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
