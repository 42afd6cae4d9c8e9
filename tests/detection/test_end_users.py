"""End users inside one key, on a tier that opts in (the shipped ``application``): each end
user scored in its own scope next to the key's, the same in both stores; one abusive end
user acted on alone; invented ids hide nothing from the key and past the cap raise its
risk; a script inventing ids is acted on among the key's newcomers of its shape, and the
key's text-side action reaches no end user. On the shipped ``default`` tier a named end
user is scored as its key alone."""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from pathlib import Path

import orjson
import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from guard_server.canonical import canonical_input
from guard_server.config.loader import Settings, load_settings
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
from guard_server.pipeline.auth import authenticate, hash_key
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.score import RiskScorer
from guard_server.pipeline.validate import validate_request
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.teacher import task
from guard_server.testing import DEFAULT_POLICY, DEMO_KEY, POLICIES, RedisProcess, write_config
from load_tests.campaign.config import APPLICATION_TIER, defended_tier
from load_tests.simulators import Reply
from load_tests.simulators.endusers import chat_app_population

START = 1_800_000_000.0
APP_KEY = "sk-test-end-users-app"
"""The key of ``app``, a client on the shipped ``application`` tier (the demo key's client,
``demo``, is on ``default``)."""


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The shipped tiers and demo clients, and ``app`` on the ``application`` tier."""
    directory = tmp_path_factory.mktemp("end-users")
    app = {"app": {"tier": APPLICATION_TIER, "keys": [hash_key(APP_KEY)]}}
    (directory / "app.yaml").write_text(yaml.safe_dump({"clients": app}))
    policies = [DEFAULT_POLICY, POLICIES / "demo-clients.yaml", directory / "app.yaml"]
    return load_settings(write_config(directory, [], policies=policies))


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
    body: dict,
    scorer: RiskScorer,
    planner: Planner,
    audit: AuditLog,
    settings: Settings,
    key: str = APP_KEY,
) -> RequestContext:
    ctx = RequestContext(
        Endpoint.CHAT,
        settings,
        CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {key}"})),
        time.perf_counter(),
    )
    ctx.body = body
    for stage in (authenticate, validate_request, apply_tier_policy, canonicalize, scorer, planner):
        await stage(ctx)
    audit.write(ctx)
    return ctx


def _stages(tmp_path: Path) -> tuple[Clock, MemoryStore, RiskScorer, Planner, AuditLog]:
    """A memory store on a driven clock, the scoring and plan stages, and an audit log."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    metrics = GuardMetrics(CollectorRegistry())
    return (
        clock,
        store,
        RiskScorer(store, metrics),
        Planner(metrics),
        AuditLog(AuditSettings(path=str(tmp_path / "audit.jsonl"))),
    )


async def test_one_abusive_end_user_is_acted_on_alone(tmp_path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    clock, _store, scorer, planner, audit = _stages(tmp_path)
    rng = random.Random(0)
    eve: list[RequestContext] = []
    others: list[RequestContext] = []
    for i in range(400):  # eve's script: clockwork, one template, maximal logprobs
        clock.now = START + 8.0 * i
        body = _request(i, "eve", logprobs=True, top_logprobs=5)
        eve.append(await _serve(body, scorer, planner, audit, settings))
        for offset in sorted(rng.uniform(0.5, 7.5) for _ in range(3)):  # the app's others
            clock.now = START + 8.0 * i + offset
            phrasing = rng.choice(task.QUESTION_TEMPLATES)
            body = _request(0, f"user-{rng.randrange(30)}")
            body["messages"][0]["content"] = phrasing.format(a=rng.randrange(20), b=7)  # repeats
            others.append(await _serve(body, scorer, planner, audit, settings))
    bad = [(c.end_user, c.plan.reason) for c in others if c.plan.action != "pass"]
    assert not bad, (len(bad), bad[:3], bad[-1])
    last = eve[-1]
    assert last.plan is not None and last.plan.action in ("perturb", "decoy")
    assert last.assessment is not None and last.assessment.action in ("pass", "tighten")
    scope = end_user_scope("app", "eve")
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
    detection = defended_tier(base=APPLICATION_TIER).detection
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


async def test_a_script_inventing_ids_is_acted_on_among_its_shapes_newcomers(  # type: ignore[no-untyped-def]
    tmp_path, settings: Settings
) -> None:
    """An app that shows logprobs: its own users for an hour (they become established),
    then a script naming a fresh id per request (clockwork, one template) while the app's
    users and new ones keep coming. The key's score reaches a text-side action; only the
    script's requests get one, from the scope of the key's newcomers of its shape."""
    clock, _store, scorer, planner, audit = _stages(tmp_path)
    rng = random.Random(1)
    logprobs = {"logprobs": True, "top_logprobs": 5}

    def honest(end_user: str) -> dict:
        body = _request(0, end_user, **logprobs)
        phrasing = rng.choice(task.QUESTION_TEMPLATES)
        body["messages"][0]["content"] = phrasing.format(a=rng.randrange(1000), b=7)
        return body

    for i in range(120):  # 4,000 s of the app's 30 users
        clock.now = START + 33.0 * i + rng.uniform(0, 20)
        await _serve(honest(f"user-{rng.randrange(30)}"), scorer, planner, audit, settings)
    script: list[RequestContext] = []
    theirs: list[RequestContext] = []
    newcomers: list[RequestContext] = []
    for i in range(600):
        clock.now = START + 4000.0 + 6.0 * i
        body = _request(i, f"id-{i}", **logprobs)
        script.append(await _serve(body, scorer, planner, audit, settings))
        if i % 10 == 3:
            clock.now += rng.uniform(0.5, 5.5)
            body = honest(f"user-{rng.randrange(30)}")
            theirs.append(await _serve(body, scorer, planner, audit, settings))
        if i % 25 == 7:
            clock.now += rng.uniform(0.5, 5.5)
            newcomers.append(await _serve(honest(f"new-{i}"), scorer, planner, audit, settings))
    audit.close()
    last = script[-1]
    assert last.plan is not None and last.plan.action in ("decoy", "block")
    assert last.plan.scope == newcomer_scope("app", last.fingerprint)
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


def _collector(i: int, rng: random.Random) -> dict:
    """A bulk collector's request ``i``: maximal logprobs, one of many phrasings, and a fresh
    end user (the legacy ``user``) at every request, so no end-user scope ever sees much."""
    phrasing = rng.choice(task.QUESTION_TEMPLATES)
    content = phrasing.format(a=1000 + i, b=rng.randrange(1000))
    return {
        "model": "teacher",
        "messages": [{"role": "user", "content": content}],
        "logprobs": True,
        "top_logprobs": 5,
        "user": f"id-{i}",
    }


async def _collect(
    settings: Settings, key: str, tmp_path: Path
) -> tuple[list[RequestContext], MemoryStore, list[dict]]:
    """The collector's 300 requests, one every 6 s, through the scoring and plan stages."""
    clock, store, scorer, planner, audit = _stages(tmp_path)
    rng = random.Random(2)
    served = []
    for i in range(300):
        clock.now = START + 6.0 * i
        served.append(await _serve(_collector(i, rng), scorer, planner, audit, settings, key))
    audit.close()
    lines = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_bytes().splitlines()]
    return served, store, lines


async def test_on_the_default_tier_a_named_end_user_is_scored_as_its_key(  # type: ignore[no-untyped-def]
    tmp_path, settings: Settings
) -> None:
    """The shipped ``default`` tier does not score end users: a collector that names a fresh
    one at every request is decoyed by its key's evidence (maximal logprobs, clockwork) as
    if it named none; the ids are only written to the audit log."""
    served, store, lines = await _collect(settings, DEMO_KEY, tmp_path)
    assert all(ctx.client is not None and ctx.client.tier.name == "default" for ctx in served)
    first = next(i for i, c in enumerate(served) if c.plan and c.plan.action in TEXT_ACTIONS)
    assert first < 30  # from clockwork timing on (20 requests)
    for i, ctx in enumerate(served[first:], first):
        assert ctx.plan is not None and ctx.plan.action in TEXT_ACTIONS, ctx.plan.reason
        assert i < 150 or ctx.plan.action in ("decoy", "block"), ctx.plan.reason
        assert not ctx.plan.by_end_user and ctx.plan.scope == "demo"
        assert ctx.plan.limit_scope == "c:demo"  # the key's own bucket
        assert "held at tighten" not in ctx.plan.reason
    assert all(c.end_user_assessment is None and c.newcomers_assessment is None for c in served)
    profile, _ = await store.peek("demo")
    assert profile is not None and profile.total == 300 and profile.end_users == 0
    assert await store.peek(end_user_scope("demo", "id-299")) == (None, None)
    assert await store.peek(newcomer_scope("demo", served[-1].fingerprint)) == (None, None)
    last = lines[-1]
    assert last["end_user"] == "id-299" and last["action"] == served[-1].plan.action  # type: ignore[union-attr]
    assert not {"scope", "end_user_risk", "newcomers_risk"} & set(last)


async def test_on_the_application_tier_the_key_alone_only_tightens_named_end_users(  # type: ignore[no-untyped-def]
    tmp_path, settings: Settings
) -> None:
    """The same collector on the ``application`` tier: its key's score calls for a text-side
    action, held at ``tighten`` for every request (each names an end user), and spread over
    many phrasings no newcomers' scope gathers the evidence to act. This is the price of
    scoring end users, and why only known applications go on that tier."""
    served, store, _ = await _collect(settings, APP_KEY, tmp_path)
    assert all(c.client is not None and c.client.tier.name == APPLICATION_TIER for c in served)
    key_text = [ctx for ctx in served if ctx.assessment.action in TEXT_ACTIONS]  # type: ignore[union-attr]
    assert len(key_text) > 150
    for ctx in served:
        assert ctx.plan is not None and ctx.plan.action in ("pass", "tighten"), ctx.plan.reason
        assert ctx.end_user_assessment is not None and ctx.newcomers_assessment is not None
    assert all("held at tighten for this end user" in c.plan.reason for c in key_text)  # type: ignore[union-attr]
    profile, _ = await store.peek("app")
    assert profile is not None and profile.end_users == pytest.approx(300, rel=0.02)
