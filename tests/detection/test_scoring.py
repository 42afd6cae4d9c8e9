"""Detection alone: features, the distinct counter, profiles in both stores, the score."""

from __future__ import annotations

import pytest

from guard_server.canonical import canonical_input
from guard_server.detection.features import RequestFeatures, extract_features, template_of
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import assess
from guard_server.detection.sketches import DistinctCounter
from guard_server.openai_fields import Endpoint
from guard_server.state.memory import MemoryStore

THRESHOLDS = {"tighten": 0.35, "perturb": 0.4, "decoy": 0.45, "block": 0.95}


def _chat(text: str, system: str | None = None, **fields: object) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return {"model": "teacher", "messages": messages, **fields}


def _features(body: dict, endpoint: Endpoint = Endpoint.CHAT) -> RequestFeatures:
    return extract_features(canonical_input(endpoint, body), 5)


def test_one_script_shares_a_fingerprint_across_numbers() -> None:
    a = _features(_chat("What is 12 + 7?", max_tokens=5))
    b = _features(_chat("What is 480 + 3?", max_tokens=5))
    other = _features(_chat("What is 12 + 7?", "Be terse."))
    assert a.fingerprint == b.fingerprint != other.fingerprint
    assert a.prompt_hashes != b.prompt_hashes
    assert template_of("What  is 12+7?") == "what is #+#?"


def test_max_top_means_at_the_tier_cap() -> None:
    body = _chat("hi", logprobs=True, top_logprobs=5)
    assert _features(body).max_top
    assert not _features({**body, "top_logprobs": 2}).max_top


def test_distinct_counter_is_exact_when_small_and_close_when_large() -> None:
    counter = DistinctCounter(k=256)
    for i in range(200):
        counter.add(f"{hash(('x', i)) & (2**64 - 1):016x}")
        counter.add(f"{hash(('x', i)) & (2**64 - 1):016x}")
    assert counter.count() == 200
    import hashlib

    for i in range(20_000):
        counter.add(hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest())
    assert abs(counter.count() - 20_200) / 20_200 < 0.15


def _profile(**fields: float) -> ClientProfile:
    base = dict(requests=10, total=10, distinct_prompts=10, logprob_share=0, max_top_share=0,
                logit_bias_share=0, gap_mean_s=5, gap_var_s2=25, fingerprint="f")  # fmt: skip
    return ClientProfile(**{**base, **fields})  # type: ignore[arg-type]


def test_score_is_the_sum_of_its_explained_parts() -> None:
    extractor = _profile(
        total=3000, requests=3000, distinct_prompts=3000, max_top_share=1, logprob_share=1,
        gap_mean_s=0.1, gap_var_s2=0.0001,
    )  # fmt: skip
    verdict = assess(extractor, None, THRESHOLDS)
    assert verdict.action in ("decoy", "block")
    assert verdict.score == pytest.approx(sum(verdict.contributions.values()), abs=1e-3)
    assert set(verdict.contributions) >= {"distinct_prompts", "max_top_logprobs", "regular_timing"}
    honest = assess(_profile(total=400, requests=400, distinct_prompts=120), None, THRESHOLDS)
    assert honest.action == "pass" and honest.score < 0.1


def test_a_campaign_raises_every_member() -> None:
    member = _profile(total=40, requests=40, distinct_prompts=40, max_top_share=1, logprob_share=1)
    alone = assess(member, CampaignProfile(1, 40, 1.0), THRESHOLDS)
    hydra = assess(member, CampaignProfile(60, 2400, 1.0), THRESHOLDS)
    assert alone.action == "pass"
    assert hydra.action != "pass" and hydra.contributions["campaign"] > 0.2


async def test_both_stores_build_the_same_profile(store) -> None:  # type: ignore[no-untyped-def]
    for i in range(50):
        body = _chat(f"What is {i % 25} + 1?", logprobs=True, top_logprobs=5)
        features = _features(body)
        for client in ("alice", "bob"):
            profile, campaign = await store.observe(client, features)
    assert profile.total == 50
    assert profile.distinct_prompts == 25
    assert profile.max_top_share == pytest.approx(1 - 0.98**50, abs=1e-6)
    assert campaign.members == 2 and campaign.distinct_prompts == 25
    peeked, peeked_campaign = await store.peek("bob")
    assert peeked is not None and peeked.total == 50 and peeked_campaign is not None
    assert peeked_campaign.members == 2
    assert peeked_campaign.max_top_share == pytest.approx(campaign.max_top_share, abs=1e-9)
    assert await store.peek("nobody") == (None, None)


async def test_a_batch_counts_as_one_request_per_prompt_in_one_call(store) -> None:  # type: ignore[no-untyped-def]
    prompts = [f"Q: {i} + 1 =" for i in range(4)]
    batch = _features({"model": "t", "prompt": prompts, "logprobs": 5}, Endpoint.COMPLETIONS)
    assert batch.prompts == 4
    profile, campaign = await store.observe("carol", batch)
    profile, campaign = await store.observe("carol", batch)
    assert profile.total == 8 and profile.distinct_prompts == 4
    assert profile.max_top_share == pytest.approx(1 - 0.98**8, abs=1e-6)
    assert profile.gap_mean_s < 5  # one gap between the two requests, not seven
    assert campaign.distinct_prompts == 4 and campaign.members == 1
    assert campaign.max_top_share == pytest.approx(1 - 0.98**8, abs=1e-6)


def test_memory_store_forgets_the_least_recent_profiles() -> None:
    import asyncio

    store = MemoryStore(max_profiles=100)
    features = _features(_chat("hi"))
    for i in range(1000):
        asyncio.run(store.observe(f"client-{i}", features))
    assert asyncio.run(store.peek("client-0")) == (None, None)
    assert asyncio.run(store.peek("client-999"))[0] is not None


def test_volume_alone_reaches_decoy_unless_the_tier_allows_more() -> None:
    # A text-only collector: every request new, no logprobs, Poisson-like timing.
    collector = _profile(total=1300, requests=1300, distinct_prompts=1200, gap_mean_s=5,
                         gap_var_s2=25)  # fmt: skip
    assert set(assess(collector, None, THRESHOLDS).contributions) == {"distinct_prompts", "novelty"}
    assert assess(collector, None, THRESHOLDS).action == "decoy"
    batch_tier = assess(collector, None, THRESHOLDS, distinct_ramp=(5_000, 50_000))
    assert batch_tier.action == "pass"
    young = _profile(total=400, requests=400, distinct_prompts=400, gap_mean_s=5, gap_var_s2=25)
    assert assess(young, None, THRESHOLDS).action == "pass"
