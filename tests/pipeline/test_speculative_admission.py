"""The admission stage with a speculative store (Redis): it keeps the admission the score
stage took with the observation when the plan agrees, and otherwise corrects it: a request
whose plan was tightened or blocked in between holds nothing the plan did not admit."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from guard_server.detection.features import extract_features
from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.pipeline.admit import Admitter
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import limits_of
from guard_server.state.base import LimitSpec
from guard_server.state.redis import RedisStore
from guard_server.testing import RedisProcess
from tests.pipeline.helpers import context, planned_for_client

LIMITS = LimitSpec(requests_per_minute=20, tokens_per_minute=100_000, concurrent_requests=20)
CHAT = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    redis_store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield redis_store
    await redis_store.close()


async def _speculated(admitter: Admitter, store: RedisStore, client_id: str) -> RequestContext:
    """A request of ``client_id`` planned as pass, its admission taken with its observation
    under the limits of a pass (what the score stage does)."""
    ctx = context(CHAT)
    await authenticate(ctx)
    assert ctx.client is not None
    ctx.client = dataclasses.replace(ctx.client, id=client_id, limits=LIMITS)
    await planned_for_client(ctx)
    assert ctx.canonical is not None and ctx.plan is not None and ctx.plan.action == "pass"
    request = admitter.request_for(ctx, limits_of(ctx.client, "pass"))
    features = extract_features(ctx.canonical, 5)
    _, _, admission = await store.observe_admit(client_id, features, request, want=False)
    ctx.speculation = (request, admission)
    return ctx


def _admitter(store: RedisStore) -> Admitter:
    return Admitter(store, GuardMetrics(CollectorRegistry()), fail_open=False, slot_ttl_s=60)


def _corrected(admitter: Admitter) -> float:
    return admitter.metrics.admissions_corrected._value.get()


async def test_a_plan_that_agrees_keeps_the_speculative_admission(store: RedisStore) -> None:
    admitter = _admitter(store)
    client = uuid.uuid4().hex[:8]
    for i in range(3):
        ctx = await _speculated(admitter, store, client)
        assert ctx.speculation is not None
        await admitter(ctx)
        assert ctx.admission is ctx.speculation[1]
        assert ctx.admission is not None and ctx.admission.remaining_requests == pytest.approx(
            19 - i, abs=0.2
        )
    assert _corrected(admitter) == 0


async def test_a_tightened_plan_is_admitted_under_its_own_limits(store: RedisStore) -> None:
    admitter = _admitter(store)
    client = uuid.uuid4().hex[:8]
    for _ in range(3):  # the tightened plan allows 5 requests/min (a quarter)
        ctx = await _speculated(admitter, store, client)
        assert ctx.client is not None and ctx.plan is not None
        tight = limits_of(ctx.client, "tighten")
        ctx.plan = dataclasses.replace(ctx.plan, action="tighten", limits=tight)
        await admitter(ctx)
    assert tight.requests_per_minute == 5
    assert ctx.admission is not None
    assert ctx.admission.remaining_requests == pytest.approx(2, abs=0.2)
    assert ctx.admission.shown_requests == pytest.approx(17, abs=0.2)
    assert ctx.admission.in_flight == 3
    # The first was corrected; the next two were deferred (speculated as a pass, they would
    # have ended the tightening) and admitted plainly.
    assert _corrected(admitter) == 1


async def test_a_blocked_plan_gives_back_what_was_speculated(store: RedisStore) -> None:
    admitter = _admitter(store)
    client = uuid.uuid4().hex[:8]
    blocked = await _speculated(admitter, store, client)
    assert blocked.plan is not None
    blocked.plan = dataclasses.replace(blocked.plan, action="block")
    with pytest.raises(GuardError) as caught:
        await admitter(blocked)
    assert caught.value.status == 403 and blocked.admission is None
    after = await _speculated(admitter, store, client)
    await admitter(after)
    assert after.admission is not None and after.admission.in_flight == 1
    assert after.admission.remaining_requests == pytest.approx(19, abs=0.2)
