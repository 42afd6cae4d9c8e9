"""A tightened client's rate-limit headers read like an unflagged client's: the same limit,
the same remaining after the same spending, refilling at the same rate, with no jump when
tightening starts or ends."""

from __future__ import annotations

from guard_server.pipeline.admit import ratelimit_headers
from guard_server.state.base import LimitSpec
from guard_server.state.memory import MemoryStore

CONFIGURED = LimitSpec(requests_per_minute=60, tokens_per_minute=6000)
TIGHTENED = LimitSpec(requests_per_minute=15, tokens_per_minute=1500)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _send(store: MemoryStore, limits: LimitSpec, count: int) -> list[dict[str, str]]:
    shown = None if limits == CONFIGURED else CONFIGURED
    seen = []
    for i in range(count):
        admission = await store.admit("c:x", limits, 40, f"s{i}", 60, shown=shown)
        seen.append(ratelimit_headers(CONFIGURED, limits, admission))
    return seen


async def test_until_the_tight_limit_binds_the_headers_are_the_unflagged_ones() -> None:
    unflagged = await _send(MemoryStore(clock=_Clock()), CONFIGURED, 15)
    tightened = await _send(MemoryStore(clock=_Clock()), TIGHTENED, 16)
    assert tightened[:15] == unflagged  # request by request
    assert tightened[0]["x-ratelimit-remaining-requests"] == "59"
    refused = tightened[15]
    assert refused["x-ratelimit-limit-requests"] == "60"
    assert refused["x-ratelimit-remaining-requests"] == "0"  # as any 429 says


async def test_no_jump_when_tightening_starts_or_ends_and_the_same_refill() -> None:
    clock = _Clock()
    store = MemoryStore(clock=clock)
    before = await _send(store, CONFIGURED, 50)  # 10 requests left
    assert before[-1]["x-ratelimit-remaining-requests"] == "10"
    during = await _send(store, TIGHTENED, 2)
    assert [h["x-ratelimit-remaining-requests"] for h in during] == ["9", "8"]
    clock.now += 5  # 5 s idle: the configured rate refills 5 requests, as for anyone
    during = await _send(store, TIGHTENED, 1)
    assert during[0]["x-ratelimit-remaining-requests"] == "12"
    after = await _send(store, CONFIGURED, 1)  # tightening over: the bucket carries on
    assert after[0]["x-ratelimit-remaining-requests"] == "11"
