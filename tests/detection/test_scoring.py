"""Detection alone: features, profiles in both stores, the score."""

from __future__ import annotations

import pytest

from guard_server.canonical import canonical_input
from guard_server.detection.features import RequestFeatures, extract_features, template_of
from guard_server.detection.profile import CampaignProfile, ClientProfile
from guard_server.detection.scoring import assess
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


def _profile(**fields: float) -> ClientProfile:
    base = dict(requests=10, total=10, distinct_prompts=10, distinct_week=10, logprob_share=0,
                max_top_share=0, logit_bias_share=0, gap_mean_s=5, gap_var_s2=25,
                fingerprint="f")  # fmt: skip
    merged = {**base, **fields}
    merged.setdefault("window_requests", merged["total"])
    return ClientProfile(**merged)  # type: ignore[arg-type]


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


def test_volume_alone_tightens_at_most_and_says_why() -> None:
    # A text-only collector: every request new, no logprobs, Poisson-like timing.
    collector = _profile(total=1300, requests=1300, distinct_prompts=1200, distinct_week=1200,
                         gap_mean_s=5, gap_var_s2=25)  # fmt: skip
    verdict = assess(collector, None, THRESHOLDS)
    assert set(verdict.contributions) == {"distinct_prompts", "novelty"}
    assert verdict.score >= THRESHOLDS["decoy"]
    assert verdict.action == "tighten"
    assert "decoy held at tighten" in verdict.note and verdict.evidence == 0
    batch_tier = assess(collector, None, THRESHOLDS, distinct_ramp=(5_000, 50_000))
    assert batch_tier.action == "pass" and not batch_tier.note
    young = _profile(total=400, requests=400, distinct_prompts=400, gap_mean_s=5, gap_var_s2=25)
    assert assess(young, None, THRESHOLDS).action == "pass"


def test_maximal_logprobs_alone_is_not_enough_evidence_for_a_decoy() -> None:
    # An evaluation run: every prompt new, the tier's maximal top-k, irregular timing.
    evaluation = _profile(total=2000, requests=2000, distinct_prompts=1900, max_top_share=1,
                          logprob_share=1, gap_mean_s=0.4, gap_var_s2=0.16)  # fmt: skip
    verdict = assess(evaluation, None, THRESHOLDS)
    assert verdict.score >= THRESHOLDS["decoy"] and verdict.action == "tighten"
    # The same client scripted (one template, clockwork): extraction evidence, decoyed.
    script = _profile(total=2000, requests=2000, distinct_prompts=1900, max_top_share=1,
                      logprob_share=1, gap_mean_s=1.5, gap_var_s2=0.01,
                      templated_share=1.0)  # fmt: skip
    scripted = assess(script, None, THRESHOLDS)
    assert scripted.evidence >= 0.375 and scripted.action in ("decoy", "block")
    assert not scripted.note
    # A stricter tier may ask for more evidence.
    assert assess(script, None, THRESHOLDS, evidence_min=0.9).action == "tighten"


def test_repeats_discount_distinct_prompts() -> None:
    """An application whose users re-ask popular questions collects little new data."""
    app = _profile(total=6000, requests=6000, distinct_prompts=1500, distinct_week=1500)
    assert app.novelty == 0.25
    verdict = assess(app, None, THRESHOLDS)
    assert verdict.action == "pass", verdict
    new = assess(_profile(total=3000, requests=3000, distinct_prompts=1500), None, THRESHOLDS)
    assert new.contributions["distinct_prompts"] == 0.45


def test_a_long_history_without_evidence_slows_the_volume_ramp() -> None:
    day = 86400.0
    busy = dict(total=1500, requests=1500, distinct_prompts=1100, distinct_week=1100)
    new_key = assess(_profile(**busy), None, THRESHOLDS)
    week_old = assess(_profile(**busy, age_s=6 * day), None, THRESHOLDS)
    veteran = assess(_profile(**busy, age_s=35 * day), None, THRESHOLDS)
    assert new_key.contributions == week_old.contributions  # nothing before a week
    assert new_key.action == "tighten" and veteran.action == "pass"
    assert veteran.contributions["distinct_prompts"] < 0.1  # ramp 800 -> 2,400
    # With extraction evidence, history buys nothing.
    scripted = dict(busy, max_top_share=1.0, logprob_share=1.0, templated_share=1.0)
    assert assess(_profile(**scripted, age_s=35 * day), None, THRESHOLDS).contributions == (
        assess(_profile(**scripted), None, THRESHOLDS).contributions
    )
