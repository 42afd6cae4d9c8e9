"""Settlement never holds up an answer: it runs in a task of its own, at most ``SETTLING`` at
once against the store, and a failed one is counted and logged, never lost silently."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
from prometheus_client import CollectorRegistry

from guard_server.metrics import GuardMetrics
from guard_server.pipeline.admit import SETTLING, Admitter
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.context import RequestContext
from guard_server.state.base import LimitSpec, StateUnavailable
from guard_server.state.memory import MemoryStore
from tests.pipeline.helpers import context, planned_for_client

LIMITS = LimitSpec(requests_per_minute=10_000, concurrent_requests=1_000)
CHAT = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class _StuckSettlements(MemoryStore):
    """A store whose settlements wait until released (a slow backend), or fail."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.waiting = 0
        self.most_waiting = 0
        self.error = error

    async def settle(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if self.error is not None:
            raise self.error
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        await self.release.wait()
        self.waiting -= 1
        await super().settle(*args, **kwargs)


async def _admitted(admitter: Admitter) -> RequestContext:
    ctx = context(CHAT)
    await authenticate(ctx)
    assert ctx.client is not None
    ctx.client = dataclasses.replace(ctx.client, limits=LIMITS)
    await planned_for_client(ctx)
    await admitter(ctx)
    ctx.status = 200
    return ctx


def _admitter(store: MemoryStore) -> Admitter:
    return Admitter(store, GuardMetrics(CollectorRegistry()), fail_open=False, slot_ttl_s=60)


async def test_settlement_does_not_hold_up_the_answer_and_is_bounded() -> None:
    store = _StuckSettlements()
    admitter = _admitter(store)
    answered = [await _admitted(admitter) for _ in range(SETTLING + 36)]
    for ctx in answered:
        admitter.settle(ctx)  # returns at once: the answer goes out while Redis is slow
    await asyncio.sleep(0.05)
    assert store.waiting == SETTLING  # the rest wait their turn
    probe = await _admitted(admitter)
    assert probe.admission is not None and probe.admission.in_flight == len(answered) + 1
    store.release.set()
    await admitter.drain()
    assert store.most_waiting == SETTLING
    again = await _admitted(admitter)
    assert again.admission is not None and again.admission.in_flight == 2  # probe's and its own


@pytest.mark.parametrize("error", [StateUnavailable("down"), RuntimeError("a bug")])
async def test_a_failed_settlement_is_counted_and_logged(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    admitter = _admitter(_StuckSettlements(error))
    ctx = await _admitted(admitter)
    with caplog.at_level(logging.WARNING, logger="guard_server.pipeline.admit"):
        admitter.settle(ctx)
        await admitter.drain()
    assert admitter.metrics.state_errors._value.get() == 1
    assert str(error) in caplog.text
