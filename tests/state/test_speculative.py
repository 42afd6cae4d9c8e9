"""The Redis store's speculative admission: taken in the observing call, under the limits the
plan is expected to have, and corrected atomically when the plan has others. A corrected
admission leaves the buckets as if only the right one had ever been taken."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import AsyncIterator

import pytest

from guard_server.detection.features import RequestFeatures
from guard_server.state.base import Admission, AdmitRequest, LimitSpec
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.testing import RedisProcess

CONFIGURED = LimitSpec(requests_per_minute=6, tokens_per_minute=600, concurrent_requests=3)
TIGHTENED = LimitSpec(requests_per_minute=3, tokens_per_minute=300, concurrent_requests=1)
# What each plan admits under: (limits, the shown ones); None: blocked, nothing admitted.
PLANS: dict[str, tuple[LimitSpec, LimitSpec | None] | None] = {
    "pass": (CONFIGURED, None),
    "tighten": (TIGHTENED, CONFIGURED),
    "block": None,
}


@pytest.fixture
async def redis_store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield store
    await store.close()


def _features(prompt: str) -> RequestFeatures:
    return RequestFeatures(
        prompt_hashes=(hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest(),),
        fingerprint="fp",
        wants_logprobs=False,
        max_top=False,
        logit_bias=False,
    )


def _request(scope: str, plan: str, tokens: int = 100) -> AdmitRequest | None:
    limits = PLANS[plan]
    if limits is None:
        return None
    spec, shown = limits
    return AdmitRequest(scope, spec, tokens, uuid.uuid4().hex, 60, 1, shown)


async def _speculated(
    store: RedisStore, client: str, predicted: str, actual: str, prompt: str
) -> Admission | None:
    """One request the way the pipeline takes it: admitted as ``predicted`` with its
    observation, then kept, corrected or taken afresh as ``actual``."""
    taken = _request(f"c:{client}", predicted)
    needed = _request(f"c:{client}", actual)
    _, _, admission = await store.observe_admit(client, _features(prompt), taken, want=True)
    if taken == needed and admission is not None:
        return admission
    if taken is not None and admission is not None and admission.allowed:
        return await store.readmit(taken, needed)
    if needed is None:
        return None
    return await _direct(store, needed)


async def _direct(store: RedisStore | MemoryStore, request: AdmitRequest) -> Admission:
    return await store.admit(
        request.scope,
        request.spec,
        request.tokens,
        request.slot,
        request.slot_ttl_s,
        requests=request.requests,
        shown=request.shown,
    )


def _same(got: Admission | None, expected: Admission | None) -> bool:
    """The same verdict and the same bucket levels (up to what refills in a moment)."""
    if got is None or expected is None:
        return got is expected
    # Redis' clock refills the buckets between the two clients' calls: up to a second of it
    # on a loaded machine (0.1 request, 10 tokens at these limits); a request costs 1 and 100.
    slack = {"remaining_requests": 0.2, "shown_requests": 0.2}
    levels = ("remaining_requests", "remaining_tokens", "shown_requests", "shown_tokens")
    return (got.allowed, got.exceeded, got.in_flight) == (
        expected.allowed,
        expected.exceeded,
        expected.in_flight,
    ) and all(
        getattr(got, name) == pytest.approx(getattr(expected, name), abs=slack.get(name, 20))
        for name in levels
    )


@pytest.mark.parametrize(("predicted", "actual"), list(itertools.product(PLANS, repeat=2)))
async def test_a_corrected_admission_leaves_the_buckets_as_the_right_one_would(
    redis_store: RedisStore, predicted: str, actual: str
) -> None:
    # Twice the plan's allowance, so both admissions and refusals are compared; every
    # request is speculated wrong (`predicted`) on one client and admitted right (`actual`)
    # on another, and both see the same verdicts and levels.
    speculated, direct = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    for i in range(8):
        got = await _speculated(redis_store, speculated, predicted, actual, f"q{i}")
        needed = _request(f"c:{direct}", actual)
        expected = await _direct(redis_store, needed) if needed is not None else None
        assert _same(got, expected), (i, got, expected)
    # ... and what is left of the buckets after the last one is the same too (a blocked
    # request, which returns no admission, must have given back all it was speculated).
    probe = "pass" if actual == "block" else actual
    probes = [_request(f"c:{client}", probe) for client in (speculated, direct)]
    left = [await _direct(redis_store, request) for request in probes if request is not None]
    assert _same(*left), left


async def test_a_tightened_client_cleared_is_not_speculated_past_its_buckets(
    redis_store: RedisStore,
) -> None:
    # Ending a tightening hands the configured bucket's level back to the enforced one: a
    # step `readmit` could not undo, so a speculative admission defers it to a plain one.
    client = uuid.uuid4().hex[:8]
    tightened = _request(f"c:{client}", "tighten")
    assert tightened is not None and (await _direct(redis_store, tightened)).allowed
    cleared = _request(f"c:{client}", "pass")
    _, _, deferred = await redis_store.observe_admit(client, _features("q"), cleared, want=False)
    assert deferred is None
    assert cleared is not None
    admitted = await _direct(redis_store, cleared)
    assert admitted.allowed and admitted.remaining_requests == pytest.approx(4, abs=0.05)


async def test_observe_admit_returns_what_observe_and_admit_return(
    redis_store: RedisStore,
) -> None:
    scope = f"c:{uuid.uuid4().hex[:8]}"
    client = scope[2:]
    for i in range(3):
        request = _request(scope, "pass")
        profile, campaign, admission = await redis_store.observe_admit(
            client, _features(f"q{i}"), request, want=True
        )
        assert admission is not None and admission.allowed
        assert admission.remaining_requests == pytest.approx(5 - i, abs=0.05)
        assert profile is not None and profile.total == i + 1 == profile.distinct_prompts
        assert campaign is not None and campaign.members == 1
    counted = await redis_store.observe_admit(client, _features("q9"), None, want=False)
    assert counted == (None, None, None)
    profile, _ = await redis_store.observe(client, _features("q0"))
    assert profile.total == 5 and profile.distinct_prompts == 4
