"""A tightened client's rate-limit headers read like an unflagged client's."""

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


async def _headers(limits: LimitSpec, requests: int) -> list[dict[str, str]]:
    clock = _Clock()
    store = MemoryStore(clock=clock)
    seen = []
    for i in range(requests):
        admission = await store.admit("c:x", limits, 40, f"s{i}", 60)
        seen.append(ratelimit_headers(CONFIGURED, limits, admission))
    return seen


async def test_until_the_tight_limit_binds_the_headers_are_the_unflagged_ones() -> None:
    unflagged = await _headers(CONFIGURED, 15)
    tightened = await _headers(TIGHTENED, 16)
    # The same limit, the same remaining after the same spending, the same reset: request by
    # request, nothing differs until the tightened bucket refuses.
    assert tightened[:15] == unflagged
    assert tightened[0]["x-ratelimit-limit-requests"] == "60"
    assert tightened[0]["x-ratelimit-remaining-requests"] == "59"
    refused = tightened[15]
    assert refused["x-ratelimit-limit-requests"] == "60"
    assert refused["x-ratelimit-remaining-requests"] == "0"  # as any 429 says
