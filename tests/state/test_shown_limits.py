"""Both stores keep the shown (configured) bucket beside a tightened one the same way."""

from __future__ import annotations

import time
import uuid

from guard_server.state.base import LimitSpec, StateStore

CONFIGURED = LimitSpec(requests_per_minute=60, tokens_per_minute=6000)
TIGHTENED = LimitSpec(requests_per_minute=15, tokens_per_minute=1500)


async def test_the_shown_bucket_continues_spends_and_hands_back(store: StateStore) -> None:
    scope = f"c:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()

    def refilled() -> float:
        """Requests the configured bucket may have refilled since the start (1 a second; a
        loaded machine can take seconds over these calls)."""
        return time.monotonic() - started

    for i in range(50):
        plain = await store.admit(scope, CONFIGURED, 10, f"a{i}", 60)
    assert plain.shown_requests == plain.remaining_requests
    assert plain.remaining_requests is not None
    assert 10 <= plain.remaining_requests < 10.5 + refilled()
    tight = await store.admit(scope, TIGHTENED, 10, "b", 60, shown=CONFIGURED)
    assert tight.shown_requests is not None
    assert 9 <= tight.shown_requests < 9.5 + refilled()  # no jump
    assert tight.remaining_requests is not None and tight.remaining_requests < 9.5 + refilled()
    assert tight.shown_tokens is not None
    assert 5490 <= tight.shown_tokens < 5500 + 100 * refilled()
    assert tight.remaining_tokens is not None and tight.remaining_tokens < 1500
    await store.settle(scope, TIGHTENED, tight.slot, refund_tokens=5, shown=CONFIGURED)
    again = await store.admit(scope, TIGHTENED, 10, "c", 60, shown=CONFIGURED)
    assert again.shown_tokens is not None
    assert 5485 <= again.shown_tokens < 5495 + 100 * refilled()  # refunded
    back = await store.admit(scope, CONFIGURED, 10, "d", 60)
    assert back.remaining_requests is not None
    assert 7 <= back.remaining_requests < 7.5 + refilled()
    assert back.shown_requests == back.remaining_requests


async def test_a_tightened_client_is_refused_at_the_tight_limit(store: StateStore) -> None:
    scope = f"c:{uuid.uuid4().hex[:8]}"
    verdicts = [
        await store.admit(scope, TIGHTENED, 10, f"s{i}", 60, shown=CONFIGURED) for i in range(16)
    ]
    assert [v.allowed for v in verdicts] == [True] * 15 + [False]
    assert verdicts[14].shown_requests is not None and verdicts[14].shown_requests >= 45
