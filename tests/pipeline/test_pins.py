"""The plan applies operators' pins; a reset makes every replica's scorer assess afresh."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from guard_server.config.loader import Client, load_settings
from guard_server.detection.scoring import Assessment
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import Planner, make_plan
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.score import FRESH_REQUESTS, RiskScorer
from guard_server.pipeline.validate import validate_request
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.state.review import MemoryReview, Pin
from guard_server.state.review_redis import RedisReview
from guard_server.testing import DEMO_KEY, POLICIES, RedisProcess

SETTINGS = load_settings(POLICIES / "guard.yaml")
CLIENT = SETTINGS.clients_by_id["demo"]
DECOY = Assessment(0.5, {"distinct_prompts": 0.3, "novelty": 0.1, "max_top_logprobs": 0.1}, "decoy")


def _pin(action: str, seconds: float = 60) -> Pin:
    return Pin(action, time.time() + seconds, by="alice@ops", note="ticket 7", at=time.time())


def _shadow(client: Client) -> Client:
    return dataclasses.replace(client, detection_mode="shadow")


def test_allow_serves_as_pass_and_still_records_the_score() -> None:
    plan = make_plan(SETTINGS.secret, CLIENT, DECOY, pin=_pin("allow"))
    assert (plan.action, plan.assessed, plan.pin) == ("pass", "decoy", "allow")
    assert plan.mode == "enforce"
    assert plan.decoy is None and plan.limits == plan.advertised == CLIENT.limits
    assert plan.logprob_cap == CLIENT.tier.logprobs.max_top
    assert plan.hardening == CLIENT.tier.hardening  # not the perturb stage's
    assert plan.reason.startswith("pinned allow until ")
    assert "by alice@ops" in plan.reason and "risk 0.500 >= decoy" in plan.reason
    assert plan.counted == ("pass", "pinned")


@pytest.mark.parametrize("client", [CLIENT, _shadow(CLIENT)], ids=["enforce", "shadow"])
def test_deny_blocks_whatever_the_score_and_the_mode(client: Client) -> None:
    plan = make_plan(SETTINGS.secret, client, None, pin=_pin("deny"))
    assert (plan.action, plan.assessed, plan.pin) == ("block", "pass", "deny")
    assert plan.reason.startswith("pinned deny")
    assert plan.counted == ("block", "pinned")


def test_without_a_pin_the_score_and_the_mode_decide() -> None:
    assert make_plan(SETTINGS.secret, CLIENT, DECOY).counted == ("decoy", "enforce")
    shadow = make_plan(SETTINGS.secret, _shadow(CLIENT), DECOY)
    assert (shadow.action, shadow.counted, shadow.pin) == ("pass", ("decoy", "shadow"), None)


async def _planned(planner: Planner, assessment: Assessment | None) -> RequestContext:
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {DEMO_KEY}"}))
    ctx = RequestContext(Endpoint.CHAT, SETTINGS, headers, time.perf_counter())
    ctx.body = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}]}
    await authenticate(ctx)
    await validate_request(ctx)
    await apply_tier_policy(ctx)
    await canonicalize(ctx)
    ctx.assessment = assessment
    await planner(ctx)
    return ctx


async def test_the_planner_reads_the_pin_until_it_expires_and_notes_the_score() -> None:
    review = MemoryReview(MemoryStore())
    metrics = GuardMetrics(CollectorRegistry())
    planner = Planner(metrics, review)
    await review.set_pin("demo", _pin("deny", seconds=0.2))
    ctx = await _planned(planner, DECOY)
    assert ctx.plan is not None and ctx.plan.action == "block"
    flagged = metrics.registry.get_sample_value
    assert flagged("guard_flagged_clients", {"action": "block", "mode": "pinned"}) == 1
    time.sleep(0.25)
    ctx = await _planned(planner, DECOY)
    assert ctx.plan is not None and (ctx.plan.action, ctx.plan.pin) == ("decoy", None)
    assert flagged("guard_flagged_clients", {"action": "block", "mode": "pinned"}) == 0
    assert flagged("guard_flagged_clients", {"action": "decoy", "mode": "enforce"}) == 1
    assert [client for client, _ in review.top(5)] == ["demo"]
    planner.forget("demo")  # as a reset does
    assert flagged("guard_flagged_clients", {"action": "decoy", "mode": "enforce"}) == 0


async def test_a_reset_on_one_replica_makes_the_others_assess_afresh(
    redis_server: RedisProcess,
) -> None:
    """Past its first requests a client's assessment is reused between reassessments; a
    reset on another replica must drop that cached assessment at once."""
    prefix = f"p{uuid.uuid4().hex[:8]}"
    replicas = []
    for _ in range(2):
        store = RedisStore(redis_server.url, prefix=prefix)
        review = RedisReview(store, redis_server.url, prefix=prefix, tick_s=0.2)
        scorer = RiskScorer(store, GuardMetrics(CollectorRegistry()))
        review.on_reset(scorer.forget)
        await review.start()
        replicas.append((store, review, scorer))
    (_, review_a, _), (store_b, _, scorer_b) = replicas
    try:

        async def ask(i: int) -> Assessment:
            headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {DEMO_KEY}"}))
            ctx = RequestContext(Endpoint.CHAT, SETTINGS, headers, time.perf_counter())
            ctx.body = {"model": "teacher", "messages": [{"role": "user", "content": f"q {i}"}]}
            await authenticate(ctx)
            await validate_request(ctx)
            await apply_tier_policy(ctx)
            await canonicalize(ctx)
            await scorer_b(ctx)
            assert ctx.assessment is not None
            return ctx.assessment

        for i in range(FRESH_REQUESTS + 2):
            cached = await ask(i)
        assert scorer_b._last["demo"][1] > 0  # the next request would reuse `cached`
        await review_a.reset("demo")
        waited = time.perf_counter()
        while "demo" in scorer_b._last:
            assert time.perf_counter() - waited < 1.0
            await asyncio.sleep(0.001)
        fresh = await ask(10_000)
        profile, _ = await store_b.peek("demo")
        assert profile is not None and profile.total == 1
        assert fresh.score < cached.score
    finally:
        for store, review, _ in replicas:
            await review.close()
            await store.close()
