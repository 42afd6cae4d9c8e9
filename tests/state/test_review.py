"""Review state: pins, resets and the score board, in one process and across replicas (Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from guard_server.detection.features import RequestFeatures
from guard_server.state.base import LimitSpec, StateUnavailable
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.state.review import MemoryReview, Pin, board_score, board_value
from guard_server.state.review_redis import RedisReview
from guard_server.testing import RedisProcess


def _features(prompt: str) -> RequestFeatures:
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()
    return RequestFeatures(
        prompt_hashes=(digest,),
        fingerprint="fp",
        wants_logprobs=False,
        max_top=False,
        logit_bias=False,
    )


def _pin(action: str, seconds: float, by: str = "ops") -> Pin:
    now = time.time()
    return Pin(action, now + seconds, by=by, note="test", at=now)


async def _eventually(check, timeout_s: float = 2.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``check()`` is true (fails after ``timeout_s``)."""
    started = time.perf_counter()
    while not check():
        assert time.perf_counter() - started < timeout_s, "not within the timeout"
        await asyncio.sleep(0.001)
    return time.perf_counter() - started


class Replica:
    """One guard replica's state: its own store and review state on the shared Redis."""

    def __init__(
        self, url: str, prefix: str, top_k: int = 20, idle_s: float = 3600, tick_s: float = 0.2
    ) -> None:
        self.store = RedisStore(url, prefix=prefix)
        self.review = RedisReview(
            self.store, url, prefix=prefix, top_k=lambda: top_k, tick_s=tick_s, idle_s=idle_s
        )
        self.resets: list[str] = []
        self.review.on_reset(self.resets.append)

    async def close(self) -> None:
        await self.review.close()
        await self.store.close()


@pytest.fixture
async def replicas(
    redis_server: RedisProcess, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two replicas on one Redis; ``@pytest.mark.parametrize("replicas", [tick_s],
    indirect=True)`` sets their tick (default 0.2 s)."""
    prefix, tick_s = f"r{uuid.uuid4().hex[:8]}", getattr(request, "param", 0.2)
    a = Replica(redis_server.url, prefix, tick_s=tick_s)
    b = Replica(redis_server.url, prefix, tick_s=tick_s)
    await a.review.start()
    await b.review.start()
    yield a, b
    await a.close()
    await b.close()


def test_board_values_rank_by_action_then_score() -> None:
    assert board_value(0.30, "decoy") > board_value(0.99, "perturb") > board_value(0.5, "pass")
    assert board_score(board_value(0.4567, "block")) == 0.4567
    assert board_score(board_value(1.0, "pass")) == 1.0


async def test_memory_pins_expire_and_auto_removes_them() -> None:
    review = MemoryReview(MemoryStore())
    assert review.pin_of("alice") is None
    await review.set_pin("alice", _pin("deny", 0.2))
    pin = review.pin_of("alice")
    assert pin is not None and pin.action == "deny"
    assert review.pin_of("alice", now=pin.until) is None  # expired at `until`
    await asyncio.sleep(0.25)
    assert review.pin_of("alice") is None and review.pins() == {}
    await review.set_pin("alice", _pin("allow", 60))
    await review.set_pin("alice", None)
    assert review.pin_of("alice") is None


async def test_memory_reset_forgets_the_profile_and_tells_the_listeners() -> None:
    store = MemoryStore()
    await store.admit("c:alice", LimitSpec(requests_per_minute=10), 1, "s", 60)
    for i in range(5):
        await store.observe("alice", _features(f"q{i}"))
    review = MemoryReview(store)
    review.note("alice", 0.5, "decoy")
    review.note("bob", 0.9, "perturb")
    assert [client for client, _ in review.top(5)] == ["alice", "bob"]
    heard: list[str] = []
    review.on_reset(heard.append)
    await review.reset("alice")
    assert await store.peek("alice") == (None, None)
    assert heard == ["alice"]
    assert [client for client, _ in review.top(5)] == ["bob"]
    assert len(store) == 1  # the rate-limit bucket is kept


async def test_memory_pages_follow_the_board_order() -> None:
    review = MemoryReview(MemoryStore())
    for i in range(6):
        review.note(f"c{i}", i / 10, "pass")
    review.note("tight", 0.36, "tighten")
    page, total = await review.page(0, 3)
    assert total == 7 and [client for client, _ in page] == ["tight", "c5", "c4"]
    page, _ = await review.page(3, 3)
    assert [client for client, _ in page] == ["c3", "c2", "c1"]
    assert [c for c, _ in (await review.page(0, 9, assessed="tighten"))[0]] == ["tight"]
    assert await review.values(["c1", "x"]) == {"c1": board_value(0.1, "pass")}


@pytest.mark.parametrize("replicas", [3600.0], indirect=True)  # through the channel only
async def test_a_pin_reaches_the_other_replica_at_once(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    delays = []
    for i in range(20):
        action = "deny" if i % 2 else "allow"
        await a.review.set_pin("alice", _pin(action, 60))
        assert a.review.pin_of("alice").action == action  # type: ignore[union-attr]
        delays.append(await _eventually(lambda: _action(b, "alice") == action))  # noqa: B023
    await a.review.set_pin("alice", None)
    await _eventually(lambda: b.review.pin_of("alice") is None)
    delays.sort()
    assert delays[-1] < 0.5, delays  # no tick ran: the channel carried every change
    print(f"pin A -> B: median {delays[10] * 1e6:.0f} us, max {delays[-1] * 1e6:.0f} us")


@pytest.mark.parametrize("replicas", [3600.0], indirect=True)  # through the channel only
async def test_a_reset_reaches_the_other_replica_at_once(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    for i in range(10):
        await b.store.observe("alice", _features(f"q{i}"))
    b.review.note("alice", 0.5, "decoy")
    await b.review.tick()
    await a.review.tick()
    assert [client for client, _ in a.review.top(5)] == ["alice"]
    await a.review.reset("alice")
    assert (await b.store.peek("alice")) == (None, None)
    await _eventually(lambda: b.resets == ["alice"])
    assert a.resets == ["alice"]  # the replica that reset it, once
    assert a.review.top(5) == [] and b.review.top(5) == []
    assert await a.review.page(0, 10) == ([], 0)


async def test_the_board_is_shared_and_its_top_is_bounded(redis_server: RedisProcess) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}"
    a, b = Replica(redis_server.url, prefix, top_k=3), Replica(redis_server.url, prefix, top_k=3)
    try:
        for i in range(10):
            (a if i % 2 else b).review.note(f"c{i}", i / 20, "pass")
        a.review.note("decoyed", 0.46, "decoy")
        await a.review.tick()
        await b.review.tick()
        await a.review.tick()
        expected = ["decoyed", "c9", "c8"]
        assert [client for client, _ in a.review.top(10)] == expected
        assert [client for client, _ in b.review.top(10)] == expected
        page, total = await b.review.page(0, 4)
        assert total == 11
        assert [client for client, _ in page] == ["decoyed", "c9", "c8", "c7"]
        page, total = await b.review.page(4, 4)
        assert [client for client, _ in page] == ["c6", "c5", "c4", "c3"]
        assert await b.review.page(0, 5, assessed="decoy") == (
            [("decoyed", board_value(0.46, "decoy"))],
            1,
        )
        assert (await b.review.page(0, 100, assessed="pass"))[1] == 10
        assert await a.review.values(["c3", "nobody"]) == {"c3": board_value(0.15, "pass")}
    finally:
        await a.close()
        await b.close()


async def test_idle_clients_leave_the_board(redis_server: RedisProcess) -> None:
    replica = Replica(redis_server.url, f"r{uuid.uuid4().hex[:8]}", idle_s=0.3)
    try:
        replica.review.note("old", 0.2, "pass")
        await replica.review.tick()
        await asyncio.sleep(0.4)
        replica.review.note("new", 0.1, "pass")
        await replica.review.tick()
        assert (await replica.review.page(0, 10))[0] == [("new", board_value(0.1, "pass"))]
    finally:
        await replica.close()


async def test_expired_pins_are_dropped_from_redis(
    replicas: tuple[Replica, Replica], redis_server: RedisProcess
) -> None:
    a, b = replicas
    await a.review.set_pin("alice", _pin("deny", 0.3))
    await a.review.set_pin("bob", _pin("allow", 60))
    await _eventually(lambda: _action(b, "alice") == "deny")
    await asyncio.sleep(0.35)
    assert b.review.pin_of("alice") is None  # expired on its own, no message needed
    await a.review.tick()
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert list(await raw.hgetall(a.review._keys[2])) == ["bob"]
    finally:
        await raw.aclose()


async def test_a_missed_message_is_made_good_by_the_next_tick(
    replicas: tuple[Replica, Replica], redis_server: RedisProcess
) -> None:
    a, b = replicas
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:  # written without publishing, as if B's channel had been down
        await raw.hset(a.review._keys[2], "carol", json.dumps(_pin("deny", 60).to_json()))
    finally:
        await raw.aclose()
    assert b.review.pin_of("carol") is None
    waited = await _eventually(lambda: _action(b, "carol") == "deny", timeout_s=1.0)
    assert waited <= 0.5  # one tick (0.2 s) and change


async def test_redis_down_keeps_the_pins_and_refuses_changes() -> None:
    server = RedisProcess().start()
    replica = Replica(server.url, "down")
    try:
        await replica.review.start()
        await replica.review.set_pin("alice", _pin("deny", 60))
        server.stop()
        await asyncio.sleep(0.3)
        assert _action(replica, "alice") == "deny"  # the request path reads memory
        with pytest.raises(StateUnavailable):
            await replica.review.set_pin("alice", None)
        with pytest.raises(StateUnavailable):
            await replica.review.reset("alice")
        with pytest.raises(StateUnavailable):
            await replica.review.page(0, 10)
    finally:
        await replica.close()
        server.stop()


def _action(replica: Replica, client: str) -> str | None:
    pin = replica.review.pin_of(client)
    return pin.action if pin else None


async def test_the_channel_is_followed_again_after_redis_restarts() -> None:
    server = RedisProcess().start()
    a, b = Replica(server.url, "restart", tick_s=3600), Replica(server.url, "restart", tick_s=3600)
    try:
        await a.review.start()
        await b.review.start()
        server.stop()
        await asyncio.sleep(0.5)  # B's reader notices and retries
        server = RedisProcess(port=server.port).start()  # the same address, empty
        await _eventually(lambda: b.review._following.is_set(), timeout_s=15)
        await a.review.set_pin("alice", _pin("deny", 60))
        # No tick runs (an hour apart): only the channel, followed again, can carry it.
        await _eventually(lambda: _action(b, "alice") == "deny", timeout_s=1.0)
    finally:
        await a.close()
        await b.close()
        server.stop()
