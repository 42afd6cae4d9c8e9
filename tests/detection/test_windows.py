"""Signals that forget: Redis's HyperLogLog in process, sliding windows with a driven clock,
the same profile from both stores, and what counts as one chat prompt."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from guard_server.canonical import canonical_input
from guard_server.detection.features import RequestFeatures, extract_features
from guard_server.detection.profile import DAY, WEEK
from guard_server.detection.scoring import assess
from guard_server.detection.sketches import HyperLogLog, WindowedDistinct, register_of
from guard_server.openai_fields import Endpoint
from guard_server.state.base import StateStore
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.testing import RedisProcess
from load_tests.simulators import Hydra, Mimic, Simulator, honest_population

THRESHOLDS = {"tighten": 0.35, "perturb": 0.4, "decoy": 0.45, "block": 0.95}
HOUR = 3600.0
START = 1_800_000_000.0  # a bucket boundary of both windows is not needed; any instant works


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _hex(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest()


def _chat(messages: list[tuple[str, str]], **fields: object) -> RequestFeatures:
    body = {"model": "teacher", "messages": [{"role": r, "content": c} for r, c in messages]}
    return extract_features(canonical_input(Endpoint.CHAT, {**body, **fields}), 5)


def _question(i: int) -> RequestFeatures:
    return _chat([("user", f"What is {i} + {i}?")])


@pytest.fixture(params=["memory", "redis"])
async def clocked(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StateStore, Clock]]:
    """A state store of each backend on a clock the test drives."""
    clock = Clock()
    if request.param == "memory":
        yield MemoryStore(clock=clock), clock
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:8]}", clock=clock)
    yield store, clock
    await store.close()


async def test_the_in_process_hll_counts_exactly_as_redis(redis_server: RedisProcess) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    key = f"hll:{uuid.uuid4().hex}"
    sketch = HyperLogLog()
    added = 0
    for upto in (1, 17, 200, 300, 1000, 6000):
        items = [_hex(i) for i in range(added, upto)]
        await client.pfadd(key, *items)
        for item in items:
            sketch.add(*register_of(item))
        added = upto
        assert sketch.count() == await client.pfcount(key), upto
    # The union of a window's buckets is PFCOUNT of their keys.
    keys = [f"{key}:{b}" for b in range(3)]
    window = WindowedDistinct(DAY)
    for bucket, key_of_bucket in enumerate(keys):
        items = [_hex(i % 1500) for i in range(bucket * 700, bucket * 700 + 700)]
        await client.pfadd(key_of_bucket, *items)
        window.add(START + bucket * DAY.bucket_s, [register_of(item) for item in items])
    assert window.distinct(START + 2 * DAY.bucket_s) == await client.pfcount(*keys)
    assert window.items(START + 2 * DAY.bucket_s) == 2100
    await client.aclose()


async def test_volume_signals_forget_after_their_window(clocked) -> None:  # type: ignore[no-untyped-def]
    store, clock = clocked
    for i in range(300):
        profile, campaign = await store.observe("eve", _question(i))
    assert (profile.distinct_prompts, profile.distinct_week, profile.window_requests) == (
        300, 300, 300,
    )  # fmt: skip
    assert campaign.distinct_prompts == 300
    clock.now += 12 * HOUR  # inside both windows: still counted
    profile, _ = await store.peek("eve")
    assert profile is not None and profile.distinct_prompts == 300
    clock.now += 13 * HOUR  # 25 hours on: out of the day, inside the week
    profile, campaign = await store.peek("eve")
    assert profile is not None
    assert (profile.distinct_prompts, profile.distinct_week, profile.window_requests) == (0, 300, 0)
    assert campaign is not None and campaign.distinct_prompts == 0 and campaign.members == 0
    profile, _ = await store.observe("eve", _question(0))  # a repeat of day one
    assert (profile.distinct_prompts, profile.distinct_week) == (1, 300)
    clock.now += 7 * 24 * HOUR  # a week on: nothing left
    profile, _ = await store.observe("eve", _question(10_000))
    assert (profile.distinct_prompts, profile.distinct_week, profile.window_requests) == (1, 1, 1)
    assert profile.total == 302  # the decayed profile itself lives on while the key is active
    assert profile.age_s == pytest.approx(8 * 24 * HOUR + HOUR)


async def test_redis_bucket_keys_expire_when_they_leave_their_window(
    redis_server: RedisProcess,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisStore(redis_server.url, prefix=prefix)
    await store.observe("eve", _question(1))
    await store.observe("eve", _question(2))  # a second request must not push expiry back
    client = aioredis.Redis.from_url(redis_server.url)
    ttls = {k.decode(): await client.pttl(k) for k in await client.keys(f"{prefix}:*")}
    day = [ttl for key, ttl in ttls.items() if "{c:eve}:p:day:" in key]
    week = [ttl for key, ttl in ttls.items() if "{c:eve}:p:week:" in key]
    assert len(day) == len(week) == 1
    assert (DAY.buckets - 1) * DAY.bucket_s * 1000 < day[0] <= DAY.buckets * DAY.bucket_s * 1000
    assert (
        (WEEK.buckets - 1) * WEEK.bucket_s * 1000 < week[0] <= WEEK.buckets * WEEK.bucket_s * 1000
    )
    await client.aclose()
    await store.close()


def _traffic() -> list[tuple[float, str, RequestFeatures]]:
    """A day and a half of mixed traffic: honest users, a mimic, a hydra, all interleaved."""
    window = 36 * HOUR
    sims: list[Simulator] = honest_population(8, 0, 5, window, mean_requests=20.0)
    sims += [Mimic("mimic", 5, 400, window), Hydra("hydra", 5, 400, window, keys=10)]
    planned = []
    for sim in sims:
        stream = sim.queries()
        try:
            query = stream.send(None)
            while True:
                endpoint = Endpoint.CHAT if query.endpoint == "chat" else Endpoint.COMPLETIONS
                features = extract_features(canonical_input(endpoint, query.body), 5)
                planned.append((query.at_s, query.client, features))
                from load_tests.simulators import Reply

                reply = (
                    Reply(200, " The answer is 1.", query.at_s + 1) if query.await_reply else None
                )
                query = stream.send(reply)
        except StopIteration:
            pass
    return sorted(planned, key=lambda item: item[0])


async def test_both_stores_score_the_same_traffic_the_same(redis_server: RedisProcess) -> None:
    traffic = _traffic()
    assert len(traffic) > 900
    clocks = Clock(), Clock()
    memory = MemoryStore(clock=clocks[0])
    shared = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}", clock=clocks[1])
    actions = set()
    for at_s, client, features in traffic:
        clocks[0].now = clocks[1].now = START + at_s
        mine, campaign = await memory.observe(client, features)
        theirs, their_campaign = await shared.observe(client, features)
        scale = 1 + mine.gap_mean_s**2  # the variance is a difference of two such numbers
        for name, value in dataclasses.asdict(mine).items():
            other = getattr(theirs, name)
            if isinstance(value, float):  # Lua returns 14 significant digits
                assert other == pytest.approx(value, rel=1e-9, abs=1e-9 * scale), (client, name)
            else:
                assert other == value, (client, name)
        assert (campaign.members, campaign.distinct_prompts) == (
            their_campaign.members, their_campaign.distinct_prompts,
        )  # fmt: skip
        verdict = assess(mine, campaign, THRESHOLDS)
        their_verdict = assess(theirs, their_campaign, THRESHOLDS)
        assert verdict.action == their_verdict.action, client
        assert verdict.score == pytest.approx(their_verdict.score, abs=1e-4), client
        actions.add(verdict.action)
    assert {"pass", "decoy"} <= actions  # the traffic exercised more than one action
    await shared.close()


def test_a_chat_prompt_is_its_newest_user_turn_and_its_system_prompt() -> None:
    first = _chat([("system", "Be terse."), ("user", "What is 2 + 2?")])
    later = _chat([
        ("system", "Be terse."), ("user", "What is 3 + 3?"), ("assistant", "6"),
        ("user", "What is 2 + 2?"),
    ])  # fmt: skip
    assert later.prompt_hashes == first.prompt_hashes  # the same question, the same prompt
    other_system = _chat([("system", "Be verbose."), ("user", "What is 2 + 2?")])
    assert other_system.prompt_hashes != first.prompt_hashes
    # A tool result answering the newest user turn belongs to it.
    tool = _chat([("user", "Add 2 and 2."), ("assistant", "calling"), ("tool", "4")])
    assert tool.prompt_hashes != _chat([("user", "Add 2 and 2.")]).prompt_hashes
    # Requests that differ only in bytes the model never sees are one prompt.
    assert (
        _chat([("user", "hi")], temperature=None).prompt_hashes
        == _chat([("user", "hi")]).prompt_hashes
    )
