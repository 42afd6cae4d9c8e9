"""End users inside one key: each end user scored in its own scope next to the key's, the
same in both stores; one abusive end user acted on alone; invented ids hide nothing from
the key and past the cap raise its risk; a script inventing ids is acted on among the
key's newcomers of its shape, and the key's text-side action reaches no end user."""

from __future__ import annotations

import dataclasses
import random
import time
import uuid

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from guard_server.canonical import canonical_input
from guard_server.config.loader import load_settings
from guard_server.config.schema import AuditSettings
from guard_server.detection.end_users import (
    END_USER,
    KEY,
    NEWCOMERS,
    decide,
    end_user_scope,
    newcomer_scope,
    score_with_end_user,
)
from guard_server.detection.features import RequestFeatures, extract_features
from guard_server.detection.scoring import TEXT_ACTIONS, Assessment
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.audit import AuditLog
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.score import RiskScorer
from guard_server.pipeline.validate import validate_request
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.teacher import task
from guard_server.testing import DEMO_KEY, POLICIES, RedisProcess
from load_tests.campaign.config import defended_tier
from load_tests.simulators import Reply
from load_tests.simulators.endusers import chat_app_population

SETTINGS = load_settings(POLICIES / "guard.yaml")
START = 1_800_000_000.0


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def _app_traffic(end_users: int, days: float) -> list[tuple[float, str, str, RequestFeatures]]:
    """A small chat app's requests in time order: (at, key, end user, features)."""
    planned = []
    for sim in chat_app_population("app", 3, end_users, days):
        stream = sim.queries()
        try:
            query = stream.send(None)
            while True:
                features = extract_features(canonical_input(Endpoint.CHAT, query.body), 5)
                planned.append(
                    (query.at_s, query.client, query.body["safety_identifier"], features)
                )
                reply = Reply(200, " 1", query.at_s + 1) if query.await_reply else None
                query = stream.send(reply)
        except StopIteration:
            pass
    return sorted(planned, key=lambda item: item[0])


async def test_both_stores_score_end_users_the_same(redis_server: RedisProcess) -> None:
    traffic = _app_traffic(end_users=12, days=7.2)  # abusive scripts from day 7
    assert len(traffic) > 500
    clocks = Clock(), Clock()
    memory = MemoryStore(clock=clocks[0])
    prefix = f"t{uuid.uuid4().hex[:8]}"
    # Up to 5 s a call: three scripts a request, on a machine busy with other work.
    shared = RedisStore(redis_server.url, prefix=prefix, timeout_s=5.0, clock=clocks[1])
    for at_s, key, end_user, features in traffic:
        clocks[0].now = clocks[1].now = START + at_s
        scope = end_user_scope(key, end_user)
        mine = await memory.observe_end_user(key, scope, features)
        theirs = await shared.observe_end_user(key, scope, features)
        shape = newcomer_scope(key, features.fingerprint)  # a newcomers' scope, the same way
        shapes = (
            await memory.observe_scope(shape, features),
            await shared.observe_scope(shape, features),
        )
        for ours, other in ((mine[0], theirs[0]), (mine[2], theirs[2]), shapes):
            scale = 1 + ours.gap_mean_s**2
            for name, value in dataclasses.asdict(ours).items():
                if isinstance(value, float):
                    assert getattr(other, name) == pytest.approx(
                        value, rel=1e-9, abs=1e-9 * scale
                    ), name
                else:
                    assert getattr(other, name) == value, name
    assert mine[0].end_users > 500  # the rotating script's ids, counted by the key
    profile, _ = await shared.peek(key)
    assert profile is not None and profile.end_users == mine[0].end_users
    await shared.forget(key)
    assert await shared.peek(key) == (None, None)
    await shared.close()


def _request(i: int, end_user: str | None, **fields: object) -> dict:
    body = {
        "model": "teacher",
        "messages": [{"role": "user", "content": f"Compute {i} + {i + 7}, number only."}],
        **fields,
    }
    if end_user is not None:
        body["safety_identifier"] = end_user
    return body


async def _serve(
    body: dict, scorer: RiskScorer, planner: Planner, audit: AuditLog
) -> RequestContext:
    ctx = RequestContext(
        Endpoint.CHAT,
        SETTINGS,
        CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {DEMO_KEY}"})),
        time.perf_counter(),
    )
    ctx.body = body
    for stage in (authenticate, validate_request, apply_tier_policy, canonicalize, scorer, planner):
        await stage(ctx)
    audit.write(ctx)
    return ctx


async def test_one_abusive_end_user_is_acted_on_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    store = MemoryStore(clock=clock)
    metrics = GuardMetrics(CollectorRegistry())
    scorer, planner = RiskScorer(store, metrics), Planner(metrics)
    audit = AuditLog(AuditSettings(path=str(tmp_path / "audit.jsonl")))
    rng = random.Random(0)
    eve: list[RequestContext] = []
    others: list[RequestContext] = []
    for i in range(400):  # eve's script: clockwork, one template, maximal logprobs
        clock.now = START + 8.0 * i
        body = _request(i, "eve", logprobs=True, top_logprobs=5)
        eve.append(await _serve(body, scorer, planner, audit))
        for offset in sorted(rng.uniform(0.5, 7.5) for _ in range(3)):  # the app's others
            clock.now = START + 8.0 * i + offset
            phrasing = rng.choice(task.QUESTION_TEMPLATES)
            body = _request(0, f"user-{rng.randrange(30)}")
            body["messages"][0]["content"] = phrasing.format(a=rng.randrange(20), b=7)  # repeats
            others.append(await _serve(body, scorer, planner, audit))
    bad = [(c.end_user, c.plan.reason) for c in others if c.plan.action != "pass"]
    assert not bad, (len(bad), bad[:3], bad[-1])
    last = eve[-1]
    assert last.plan is not None and last.plan.action in ("perturb", "decoy")
    assert last.assessment is not None and last.assessment.action in ("pass", "tighten")
    scope = end_user_scope("demo", "eve")
    assert last.plan.by_end_user and last.plan.scope == scope
    assert last.plan.limit_scope == f"c:{scope}"  # tightened on a bucket of its own
    assert last.plan.reason.startswith(f"end user 'eve' ({scope}): risk ")
    first_action = next(i for i, ctx in enumerate(eve) if ctx.plan and ctx.plan.action != "pass")
    assert first_action < 200
    audit.close()
    lines = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_bytes().splitlines()]
    mine = [line for line in lines if line.get("end_user") == "eve"][-1]
    assert mine["scope"] == scope and mine["end_user_assessed"] == last.plan.action
    assert mine["end_user_risk"] == last.end_user_assessment.score  # type: ignore[union-attr]
    assert mine["features"]["logprobs"] == 5 and len(mine["features"]["prompts"]) == 1
    theirs = [line for line in lines if line.get("end_user", "eve") != "eve"][-1]
    assert "scope" not in theirs and theirs["action"] == "pass"


async def test_invented_end_users_hide_nothing_from_the_key() -> None:
    detection = defended_tier().detection
    capped = detection.model_copy(
        update={"end_users": detection.end_users.model_copy(update={"max_distinct_per_day": 100})}
    )
    clock = Clock()
    plain, rotated, over_cap = (MemoryStore(clock=clock) for _ in range(3))
    for i in range(400):
        clock.now += 5.0
        body = _request(i, None, logprobs=True, top_logprobs=5)
        features = extract_features(canonical_input(Endpoint.CHAT, body), 5)
        profile, _ = await plain.observe("k", features)
        scores = await score_with_end_user(rotated, "k", f"id-{i}", features, detection)
        key, own = scores.key, scores.own
        over = await score_with_end_user(over_cap, "k", f"id-{i}", features, capped)
        capped_key, capped_own = over.key, over.own
        assert own is not None and own.action == "pass"  # each invented id is new
        assert capped_own is None if i >= 100 else capped_own is not None
    rotated_profile, _ = await rotated.peek("k")
    assert rotated_profile is not None
    # The key's scope saw all the traffic: the same profile but for the end users named.
    assert dataclasses.replace(rotated_profile, end_users=0) == profile
    assert rotated_profile.end_users == pytest.approx(400, rel=0.02)
    assert key.action in ("perturb", "decoy") and "end_user_churn" not in key.contributions
    assert capped_key.contributions["end_user_churn"] == pytest.approx(0.15)
    assert capped_key.score > key.score


def test_the_key_alone_changes_no_end_users_answers() -> None:
    decoy = Assessment(0.6, {"max_top_logprobs": 0.25, "templated": 0.15}, "decoy")
    clean = Assessment(0.1, {"logprobs": 0.05}, "pass")
    held, whose = decide(decoy, clean)
    assert whose == KEY and held is not None and held.action == "tighten"
    assert held.score == 0.6 and "decoy held at tighten for this end user" in held.note
    assert decide(decoy, None) == (decoy, KEY)  # past the cap: the key's, as it stands
    assert decide(clean, decoy) == (decoy, END_USER)
    assert decide(decoy, clean, decoy) == (decoy, NEWCOMERS)
    assert decide(clean, clean, clean) == (clean, KEY)  # a tie: the key's


async def test_a_script_inventing_ids_is_acted_on_among_its_shapes_newcomers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An app that shows logprobs: its own users for an hour (they become established),
    then a script naming a fresh id per request (clockwork, one template) while the app's
    users and new ones keep coming. The key's score reaches a text-side action; only the
    script's requests get one, from the scope of the key's newcomers of its shape."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    metrics = GuardMetrics(CollectorRegistry())
    scorer, planner = RiskScorer(store, metrics), Planner(metrics)
    audit = AuditLog(AuditSettings(path=str(tmp_path / "audit.jsonl")))
    rng = random.Random(1)
    logprobs = {"logprobs": True, "top_logprobs": 5}

    def honest(end_user: str) -> dict:
        body = _request(0, end_user, **logprobs)
        phrasing = rng.choice(task.QUESTION_TEMPLATES)
        body["messages"][0]["content"] = phrasing.format(a=rng.randrange(1000), b=7)
        return body

    for i in range(120):  # 4,000 s of the app's 30 users
        clock.now = START + 33.0 * i + rng.uniform(0, 20)
        await _serve(honest(f"user-{rng.randrange(30)}"), scorer, planner, audit)
    script: list[RequestContext] = []
    theirs: list[RequestContext] = []
    newcomers: list[RequestContext] = []
    for i in range(600):
        clock.now = START + 4000.0 + 6.0 * i
        script.append(await _serve(_request(i, f"id-{i}", **logprobs), scorer, planner, audit))
        if i % 10 == 3:
            clock.now += rng.uniform(0.5, 5.5)
            theirs.append(await _serve(honest(f"user-{rng.randrange(30)}"), scorer, planner, audit))
        if i % 25 == 7:
            clock.now += rng.uniform(0.5, 5.5)
            newcomers.append(await _serve(honest(f"new-{i}"), scorer, planner, audit))
    audit.close()
    last = script[-1]
    assert last.plan is not None and last.plan.action in ("decoy", "block")
    assert last.plan.scope == newcomer_scope("demo", last.fingerprint)
    assert last.plan.limit_scope == f"c:{last.plan.scope}"  # tightened on the shape's bucket
    assert last.plan.reason.startswith("new end user 'id-599', among the key's newcomers")
    assert last.end_user_assessment is not None and last.end_user_assessment.action == "pass"
    first = next(i for i, ctx in enumerate(script) if ctx.plan and ctx.plan.action == "decoy")
    assert first < 150
    # The key's own score would have decoyed the whole app while the script ran...
    key_text = [c for c in theirs + newcomers if c.assessment.action in TEXT_ACTIONS]  # type: ignore[union-attr]
    assert len(key_text) > 40
    # ...but no honest end user's answers changed, new or established.
    for ctx in theirs + newcomers:
        assert ctx.plan is not None and ctx.plan.action in ("pass", "tighten"), ctx.plan.reason
    assert all("held at tighten for this end user" in c.plan.reason for c in key_text)  # type: ignore[union-attr]
    assert all(c.newcomers_assessment is not None for c in newcomers)
    established = [c for c in theirs if c.newcomers_assessment is None]  # an hour old
    assert len(established) > 0.8 * len(theirs)
    lines = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_bytes().splitlines()]
    mine = next(line for line in reversed(lines) if line.get("end_user") == "id-599")
    assert mine["scope"] == last.plan.scope and mine["action"] == last.plan.action
    assert mine["newcomers_risk"] == last.newcomers_assessment.score  # type: ignore[union-attr]
    assert mine["newcomers_assessed"] == last.plan.action
