"""Both state stores keep the same limits: requests/min, tokens/min, concurrency, expiry."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from guard_server.state.base import LimitSpec, StateStore
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.testing import RedisProcess


def _scope() -> str:
    return f"c:{uuid.uuid4().hex[:8]}"


async def test_requests_per_minute(store: StateStore) -> None:
    spec, scope = LimitSpec(requests_per_minute=5), _scope()
    verdicts = [await store.admit(scope, spec, 1, f"s{i}", 60) for i in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert verdicts[-1].exceeded == "requests"
    assert 11 <= verdicts[-1].retry_after_s <= 12.5  # one request refills in 12 s
    assert verdicts[4].remaining_requests is not None and verdicts[4].remaining_requests < 1


async def test_a_batch_costs_one_request_per_prompt(store: StateStore) -> None:
    spec, scope = LimitSpec(requests_per_minute=6), _scope()
    assert (await store.admit(scope, spec, 1, "a", 60, requests=4)).allowed
    refused = await store.admit(scope, spec, 1, "b", 60, requests=4)
    assert not refused.allowed and refused.exceeded == "requests"
    assert refused.remaining_requests is not None and 1.9 < refused.remaining_requests < 2.1
    assert (await store.admit(scope, spec, 1, "c", 60, requests=2)).allowed
    # A batch above a whole minute's allowance needs a full bucket, as tokens do.
    big = _scope()
    assert (await store.admit(big, spec, 1, "d", 60, requests=10)).allowed
    assert not (await store.admit(big, spec, 1, "e", 60)).allowed


async def test_tokens_per_minute_reserve_and_refund(store: StateStore) -> None:
    spec, scope = LimitSpec(tokens_per_minute=1000), _scope()
    first = await store.admit(scope, spec, 600, "a", 60)
    assert first.allowed
    assert not (await store.admit(scope, spec, 600, "b", 60)).allowed
    await store.settle(scope, spec, first.slot, refund_tokens=500)  # it used only 100
    assert (await store.admit(scope, spec, 600, "c", 60)).allowed


async def test_a_negative_refund_charges_what_the_estimate_missed(store: StateStore) -> None:
    spec, scope = LimitSpec(tokens_per_minute=1000), _scope()
    first = await store.admit(scope, spec, 100, "a", 60)
    await store.settle(scope, spec, first.slot, refund_tokens=-700)  # it used 800
    probe = await store.admit(scope, spec, 250, "b", 60)
    assert not probe.allowed and probe.exceeded == "tokens"
    assert probe.remaining_tokens is not None and 200 <= probe.remaining_tokens < 210


async def test_concurrency_slots_release_and_expire(store: StateStore) -> None:
    spec, scope = LimitSpec(concurrent_requests=2), _scope()
    a = await store.admit(scope, spec, 1, "a", 60)
    await store.admit(scope, spec, 1, "b", 0.3)
    refused = await store.admit(scope, spec, 1, "c", 60)
    assert not refused.allowed and refused.exceeded == "concurrency"
    await store.settle(scope, spec, a.slot, 0)
    assert (await store.admit(scope, spec, 1, "d", 60)).allowed
    assert not (await store.admit(scope, spec, 1, "e", 60)).allowed
    await asyncio.sleep(0.4)  # slot b expires without ever being released
    assert (await store.admit(scope, spec, 1, "f", 60)).allowed


async def test_a_refusal_consumes_nothing(store: StateStore) -> None:
    spec, scope = LimitSpec(requests_per_minute=100, concurrent_requests=1), _scope()
    held = await store.admit(scope, spec, 1, "a", 60)
    for i in range(10):
        assert not (await store.admit(scope, spec, 1, f"x{i}", 60)).allowed
    await store.settle(scope, spec, held.slot, 0)
    after = await store.admit(scope, spec, 1, "b", 60)
    assert after.allowed and after.remaining_requests is not None
    assert after.remaining_requests >= 97.9


async def test_redis_keys_share_a_hash_tag_and_expire(redis_server: RedisProcess) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisStore(redis_server.url, prefix=prefix)
    await store.admit("c:acme", LimitSpec(requests_per_minute=10, concurrent_requests=3), 1, "s", 5)
    client = aioredis.Redis.from_url(redis_server.url)
    keys = sorted(k.decode() for k in await client.keys(f"{prefix}:*"))
    assert keys == [f"{prefix}:{{c:acme}}:bucket", f"{prefix}:{{c:acme}}:slots"]
    assert 0 < await client.pttl(keys[0]) <= 60_000
    assert 0 < await client.pttl(keys[1]) <= 5_000
    await client.aclose()
    await store.close()


async def test_redis_down_raises_state_unavailable() -> None:
    from guard_server.state.base import StateUnavailable
    from guard_server.testing import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StateUnavailable):
        await store.admit("c:x", LimitSpec(requests_per_minute=1), 1, "s", 1)
    await store.close()


async def test_memory_store_forgets_idle_scopes_a_few_at_a_time() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    spec = LimitSpec(requests_per_minute=10, concurrent_requests=5)
    for i in range(100):
        await store.admit(f"c:{i}", spec, 1, f"slot-{i}", slot_ttl_s=1000 if i == 0 else 1)
    now[0] = 120.0  # every scope idle for two minutes; c:0 still holds a live slot
    await store.admit("c:new", spec, 1, "slot-new", 1)
    assert 100 - 8 <= len(store) < 101  # bounded work per admission
    for _ in range(20):
        await store.admit("c:new", spec, 1, "slot-x", 1)
    assert set(store._scopes) == {"c:0", "c:new"}
