"""The in-process state store: token buckets and slot leases in dictionaries (one replica)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from guard_server.state.base import Admission, LimitSpec, StateStore


@dataclass(slots=True)
class _Scope:
    requests: float
    tokens: float
    updated: float
    slots: dict[str, float] = field(default_factory=dict)  # slot -> expiry


class MemoryStore(StateStore):
    """Token buckets per scope; correct for one process only (asyncio makes each call atomic)."""

    def __init__(self, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._scopes: dict[str, _Scope] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._scopes)

    def _refill(self, scope: str, spec: LimitSpec, now: float) -> _Scope:
        state = self._scopes.get(scope)
        if state is None:
            state = _Scope(
                float(spec.requests_per_minute or 0), float(spec.tokens_per_minute or 0), now
            )
            self._scopes[scope] = state
        elapsed = max(0.0, now - state.updated)
        if spec.requests_per_minute:
            rate = spec.requests_per_minute
            state.requests = min(rate, state.requests + elapsed * rate / 60)
        if spec.tokens_per_minute:
            rate = spec.tokens_per_minute
            state.tokens = min(rate, state.tokens + elapsed * rate / 60)
        state.updated = now
        if state.slots:
            for slot, expiry in list(state.slots.items()):
                if expiry <= now:
                    del state.slots[slot]
        return state

    async def admit(
        self, scope: str, spec: LimitSpec, tokens: int, slot: str, slot_ttl_s: float
    ) -> Admission:
        now = self._clock()
        state = self._refill(scope, spec, now)
        rpm, tpm, concurrency = (
            spec.requests_per_minute,
            spec.tokens_per_minute,
            spec.concurrent_requests,
        )
        needed_tokens = min(tokens, tpm) if tpm else 0
        verdict = Admission(allowed=True)
        if rpm and state.requests < 1:
            verdict = Admission(False, "requests", (1 - state.requests) * 60 / rpm)
        elif tpm and state.tokens < needed_tokens:
            verdict = Admission(False, "tokens", (needed_tokens - state.tokens) * 60 / tpm)
        elif concurrency and len(state.slots) >= concurrency:
            verdict = Admission(False, "concurrency", min(state.slots.values()) - now)
        if verdict.allowed:
            if rpm:
                state.requests -= 1
            if tpm:
                state.tokens -= tokens
            if concurrency:
                state.slots[slot] = now + slot_ttl_s
                verdict.slot = slot
            verdict.reserved_tokens = tokens
        verdict.remaining_requests = state.requests if rpm else None
        verdict.remaining_tokens = state.tokens if tpm else None
        verdict.in_flight = len(state.slots)
        self._forget_idle(now)
        return verdict

    async def settle(self, scope: str, spec: LimitSpec, slot: str, refund_tokens: int) -> None:
        state = self._scopes.get(scope)
        if state is None:
            return
        state.slots.pop(slot, None)
        if spec.tokens_per_minute and refund_tokens:
            state.tokens = min(spec.tokens_per_minute, state.tokens + refund_tokens)

    def _forget_idle(self, now: float) -> None:
        """Every 30 s, drop scopes idle for a minute with no slot: their buckets are full
        again, so forgetting them changes nothing and memory stays bounded."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 30
        for scope, state in list(self._scopes.items()):
            if not state.slots and now - state.updated > 60:
                del self._scopes[scope]
