"""The in-process state store: token buckets and slot leases in dictionaries (one replica)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from guard_server.detection.features import RequestFeatures
from guard_server.detection.profile import (
    DAY,
    GAP_ALPHA,
    HALF_LIFE_S,
    SHARE_ALPHA,
    WEEK,
    CampaignProfile,
    ClientProfile,
)
from guard_server.detection.sketches import WindowedDistinct, register_of
from guard_server.state.base import Admission, LimitSpec, StateStore

_T = TypeVar("_T")


@dataclass(slots=True)
class _Scope:
    requests: float
    tokens: float
    updated: float
    slots: dict[str, float] = field(default_factory=dict)  # slot -> expiry
    shown_requests: float | None = None  # the configured limits' buckets, while tightened
    shown_tokens: float | None = None


@dataclass(slots=True)
class _Risk:
    requests: float = 0.0
    updated: float | None = None
    since: float | None = None
    total: int = 0
    day: WindowedDistinct = field(default_factory=lambda: WindowedDistinct(DAY))
    week: WindowedDistinct = field(default_factory=lambda: WindowedDistinct(WEEK))
    logprob: float = 0.0
    max_top: float = 0.0
    logit_bias: float = 0.0
    templated: float = 0.0
    gap_mean: float = 0.0
    gap_sq: float = 0.0
    timed: bool = False  # whether a gap between two requests was seen yet
    fingerprint: str = ""
    end_users: WindowedDistinct | None = None  # once the client names one

    def snapshot(self, now: float) -> ClientProfile:
        return ClientProfile(
            requests=self.requests,
            total=self.total,
            distinct_prompts=self.day.distinct(now),
            distinct_week=self.week.distinct(now),
            window_requests=self.day.items(now),
            logprob_share=self.logprob,
            max_top_share=self.max_top,
            logit_bias_share=self.logit_bias,
            gap_mean_s=self.gap_mean,
            gap_var_s2=self.gap_sq - self.gap_mean**2,
            fingerprint=self.fingerprint,
            templated_share=self.templated,
            age_s=now - self.since if self.since is not None else 0.0,
            end_users=self.end_users.distinct(now) if self.end_users is not None else 0,
        )


@dataclass(slots=True)
class _Campaign:
    members: WindowedDistinct = field(default_factory=lambda: WindowedDistinct(DAY))
    prompts: WindowedDistinct = field(default_factory=lambda: WindowedDistinct(DAY))
    max_top: float = 0.0

    def snapshot(self, now: float) -> CampaignProfile:
        return CampaignProfile(self.members.distinct(now), self.prompts.distinct(now), self.max_top)


def _first(value: float | None, fallback: float | None) -> float | None:
    return fallback if value is None else value


class MemoryStore(StateStore):
    """Token buckets and risk profiles in this process only (one replica).

    asyncio makes each call atomic. At most ``max_profiles`` client and fingerprint
    profiles are kept; the least recently seen are forgotten first.
    """

    def __init__(self, clock=time.monotonic, max_profiles: int = 1_000_000) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()  # least recently used first
        self._max_profiles = max_profiles
        self._risk: OrderedDict[str, _Risk] = OrderedDict()
        self._campaigns: OrderedDict[str, _Campaign] = OrderedDict()

    def __len__(self) -> int:
        return len(self._scopes)

    def _refill(
        self, scope: str, spec: LimitSpec, now: float, shown: LimitSpec | None = None
    ) -> _Scope:
        state = self._scopes.get(scope)
        if state is None:
            state = _Scope(
                float((shown or spec).requests_per_minute or 0),
                float((shown or spec).tokens_per_minute or 0),
                now,
            )
            self._scopes[scope] = state
        else:
            self._scopes.move_to_end(scope)
        elapsed = max(0.0, now - state.updated)
        tightened = shown is not None and shown != spec
        for kind, rate, shown_rate in (
            ("requests", spec.requests_per_minute, shown.requests_per_minute if shown else None),
            ("tokens", spec.tokens_per_minute, shown.tokens_per_minute if shown else None),
        ):
            level, kept = getattr(state, kind), getattr(state, "shown_" + kind)
            if tightened and shown_rate:
                # The shown bucket continues the configured one (first time: from the level
                # the bucket had before the tighter limit capped it).
                base = level if kept is None else kept
                setattr(state, "shown_" + kind, min(shown_rate, base + elapsed * shown_rate / 60))
            elif kept is not None:
                level = kept  # tightening ended: the bucket takes the shown level back
                setattr(state, "shown_" + kind, None)
            if rate:
                setattr(state, kind, min(rate, level + elapsed * rate / 60))
        state.updated = now
        if state.slots:
            for slot, expiry in list(state.slots.items()):
                if expiry <= now:
                    del state.slots[slot]
        return state

    async def admit(
        self,
        scope: str,
        spec: LimitSpec,
        tokens: int,
        slot: str,
        slot_ttl_s: float,
        *,
        requests: int = 1,
        shown: LimitSpec | None = None,
    ) -> Admission:
        now = self._clock()
        state = self._refill(scope, spec, now, shown)
        rpm, tpm, concurrency = (
            spec.requests_per_minute,
            spec.tokens_per_minute,
            spec.concurrent_requests,
        )
        needed_tokens = min(tokens, tpm) if tpm else 0
        needed_requests = min(requests, rpm) if rpm else 0
        verdict = Admission(allowed=True)
        if rpm and state.requests < needed_requests:
            verdict = Admission(False, "requests", (needed_requests - state.requests) * 60 / rpm)
        elif tpm and state.tokens < needed_tokens:
            verdict = Admission(False, "tokens", (needed_tokens - state.tokens) * 60 / tpm)
        elif concurrency and len(state.slots) >= concurrency:
            verdict = Admission(False, "concurrency", min(state.slots.values()) - now)
        if verdict.allowed:
            if rpm:
                state.requests -= requests
            if tpm:
                state.tokens -= tokens
            if state.shown_requests is not None:
                state.shown_requests -= requests
            if state.shown_tokens is not None:
                state.shown_tokens -= tokens
            if concurrency:
                state.slots[slot] = now + slot_ttl_s
                verdict.slot = slot
            verdict.reserved_tokens = tokens
        verdict.remaining_requests = state.requests if rpm else None
        verdict.remaining_tokens = state.tokens if tpm else None
        verdict.shown_requests = _first(state.shown_requests, verdict.remaining_requests)
        verdict.shown_tokens = _first(state.shown_tokens, verdict.remaining_tokens)
        verdict.in_flight = len(state.slots)
        self._forget_idle(now)
        return verdict

    async def settle(
        self,
        scope: str,
        spec: LimitSpec,
        slot: str,
        refund_tokens: int,
        shown: LimitSpec | None = None,
    ) -> None:
        state = self._scopes.get(scope)
        if state is None:
            return
        state.slots.pop(slot, None)
        if spec.tokens_per_minute and refund_tokens:
            state.tokens = min(spec.tokens_per_minute, state.tokens + refund_tokens)
        if state.shown_tokens is not None and shown and shown.tokens_per_minute and refund_tokens:
            state.shown_tokens = min(shown.tokens_per_minute, state.shown_tokens + refund_tokens)

    async def observe(
        self, client: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile]:
        now = self._clock()
        risk, campaign = self._fold(client, features, now)
        return risk.snapshot(now), campaign.snapshot(now)

    async def count(self, client: str, features: RequestFeatures) -> None:
        self._fold(client, features, self._clock())

    async def observe_end_user(
        self, client: str, end_user_scope: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile, ClientProfile]:
        now = self._clock()
        risk, campaign = self._fold(client, features, now)
        if risk.end_users is None:
            risk.end_users = WindowedDistinct(DAY)
        risk.end_users.add(now, [register_of(end_user_scope)])
        mine = _touch(self._risk, end_user_scope, _Risk, self._max_profiles)
        self._fold_alone(mine, features, now)
        return risk.snapshot(now), campaign.snapshot(now), mine.snapshot(now)

    async def observe_scope(self, scope: str, features: RequestFeatures) -> ClientProfile:
        now = self._clock()
        risk = _touch(self._risk, scope, _Risk, self._max_profiles)
        self._fold_alone(risk, features, now)
        return risk.snapshot(now)

    def _fold(self, client: str, features: RequestFeatures, now: float) -> tuple[_Risk, _Campaign]:
        risk = _touch(self._risk, client, _Risk, self._max_profiles)
        registers = _registers(features)
        prompts = len(features.prompt_hashes)
        weight = _share_weight(prompts)  # `prompts` steps of the moving averages at once
        self._fold_risk(risk, features, now, registers, prompts, weight)
        campaign = _touch(self._campaigns, features.fingerprint, _Campaign, self._max_profiles)
        campaign.members.add(now, [register_of(client)])
        campaign.prompts.add(now, registers)
        campaign.max_top += weight * (features.max_top - campaign.max_top)
        return risk, campaign

    @classmethod
    def _fold_alone(cls, risk: _Risk, features: RequestFeatures, now: float) -> None:
        """Fold a request into a scope that joins no campaign (an end user's, newcomers')."""
        prompts = len(features.prompt_hashes)
        cls._fold_risk(risk, features, now, _registers(features), prompts, _share_weight(prompts))

    @staticmethod
    def _fold_risk(
        risk: _Risk,
        features: RequestFeatures,
        now: float,
        registers: list[tuple[int, int]],
        prompts: int,
        weight: float,
    ) -> None:
        if risk.updated is not None:
            gap = max(0.0, now - risk.updated)
            risk.requests *= 2 ** (-gap / HALF_LIFE_S)
            if not risk.timed:
                risk.gap_mean, risk.gap_sq, risk.timed = gap, gap * gap, True
            else:
                risk.gap_mean += GAP_ALPHA * (gap - risk.gap_mean)
                risk.gap_sq += GAP_ALPHA * (gap * gap - risk.gap_sq)
        if risk.since is None:
            risk.since = now
        risk.updated = now
        risk.requests += prompts
        risk.total += prompts
        risk.logprob += weight * (features.wants_logprobs - risk.logprob)
        risk.max_top += weight * (features.max_top - risk.max_top)
        risk.logit_bias += weight * (features.logit_bias - risk.logit_bias)
        if risk.fingerprint:  # a client's first request has nothing to repeat
            same = features.fingerprint == risk.fingerprint
            risk.templated += weight * (same - risk.templated)
        risk.fingerprint = features.fingerprint
        risk.day.add(now, registers)
        risk.week.add(now, registers)

    async def peek(self, client: str) -> tuple[ClientProfile | None, CampaignProfile | None]:
        risk = self._risk.get(client)
        if risk is None:
            return None, None
        campaign = self._campaigns.get(risk.fingerprint)
        now = self._clock()
        return risk.snapshot(now), campaign.snapshot(now) if campaign else None

    async def forget(self, client: str) -> None:
        self._risk.pop(client, None)

    def _forget_idle(self, now: float, budget: int = 8) -> None:
        """Drop scopes idle for a minute with no live slot: their buckets are full again,
        so forgetting them changes nothing and memory stays bounded. Scopes are kept in
        last-use order, so the idle ones are at the front: each admission looks at no more
        than ``budget`` of them, and the event loop never stalls on a sweep."""
        scopes = self._scopes
        for _ in range(budget):
            if not scopes:
                return
            scope, state = next(iter(scopes.items()))
            if now - state.updated <= 60:
                return
            if any(expiry > now for expiry in state.slots.values()):
                scopes.move_to_end(scope)  # a stream still holds it: look again later
                continue
            del scopes[scope]


def _registers(features: RequestFeatures) -> list[tuple[int, int]]:
    return list(map(register_of, features.prompt_hashes))


@lru_cache(maxsize=64)
def _share_weight(steps: int) -> float:
    """The weight of a new value after ``steps`` steps of a moving average with SHARE_ALPHA."""
    return 1.0 - (1.0 - SHARE_ALPHA) ** steps


def _touch(table: OrderedDict[str, _T], key: str, factory: type[_T], limit: int) -> _T:
    value = table.get(key)
    if value is None:
        value = table[key] = factory()
        if len(table) > limit:
            table.popitem(last=False)
    else:
        table.move_to_end(key)
    return value
