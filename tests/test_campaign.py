"""Extraction campaigns, small and fast: attackers get flagged, honest users do not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from load_tests.campaign.config import CampaignConfig, campaign_thresholds
from load_tests.campaign.phase import run_phase
from load_tests.campaign.replay import replay_detection, replay_summary
from load_tests.simulators import (
    BatchingCollector,
    BulkExtractor,
    Hydra,
    LowAndSlow,
    Mimic,
    Query,
    Reply,
    Simulator,
    honest_population,
)

CONFIG = CampaignConfig(window_h=0.5, compression=40.0, grace=0.25, seed=3)


def _population(cfg: CampaignConfig, hydra_budget: int = 1600) -> list[Simulator]:
    window = cfg.window_s
    sims = honest_population(15, 1, cfg.seed, window, mean_requests=6.0, suite_size=60)
    sims.append(BulkExtractor("bulk", cfg.seed, 300, window))
    sims.append(Hydra("hydra", cfg.seed, hydra_budget, window, keys=50))
    return sims


def _drain(sim: Simulator) -> list[Query]:
    stream = sim.queries()
    queries: list[Query] = []
    try:
        query = next(stream)
        while True:
            queries.append(query)
            reply = Reply(200, " The answer is 1.", query.at_s + 1) if query.await_reply else None
            query = stream.send(reply)
    except StopIteration:
        return queries


def test_simulators_are_deterministic_and_shaped_as_specified() -> None:
    window = 3600.0
    honest = honest_population(30, 1, 0, window, mean_requests=10.0, suite_size=100)
    assert [q.body for q in _drain(honest[0])] == [q.body for q in _drain(honest[0])]
    user_queries = [q for sim in honest[:30] for q in _drain(sim)]
    asked = {}
    for q in user_queries:
        asked.setdefault(q.client, []).append((q.problem.a, q.problem.b))
    # Users repeat themselves: far fewer distinct problems than requests.
    assert sum(len(set(v)) for v in asked.values()) < 0.8 * len(user_queries)
    assert not any(q.collect for q in user_queries)
    assert any(len(q.body.get("messages", [])) > 1 for q in user_queries)  # multi-turn chats

    hydra = Hydra("hydra", 0, 600, window, keys=50)
    queries = _drain(hydra)
    assert len(queries) == 600 and len({q.client for q in queries}) == 50
    assert len({(q.problem.a, q.problem.b) for q in queries}) == 600
    assert len({repr({k: v for k, v in q.body.items() if k != "messages"}) for q in queries}) == 1

    slow = LowAndSlow("slow", 0, 600, window)
    assert slow.rate_per_min() < 60
    mimic = _drain(Mimic("mimic", 0, 600, window))
    assert len({(q.problem.a, q.problem.b) for q in mimic}) < 500  # blended repeats
    bulk = _drain(BulkExtractor("bulk", 0, 300, window))
    assert all(q.body["logprobs"] == 20 for q in bulk)
    assert [q.at_s for q in bulk] == sorted(q.at_s for q in bulk)


def test_replayed_detection_flags_attackers_not_honest_users() -> None:
    cfg = replace(CONFIG, window_h=2.0)
    sims = _population(cfg, hydra_budget=2000)
    sims.append(LowAndSlow("low-and-slow", cfg.seed, 300, cfg.window_s))
    # Text-only collectors with no logprobs and human-like timing: volume gives them away.
    sims.append(LowAndSlow("low-and-slow-long", cfg.seed, 1500, cfg.window_s))
    sims.append(Mimic("mimic", cfg.seed, 2500, cfg.window_s))
    summary = replay_summary(sims, replay_detection(sims, campaign_thresholds()))
    attackers = summary["attackers"]
    assert summary["honest"]["flagged"] == 0, summary["honest"]
    assert attackers["bulk"]["first_flagged"] <= 200
    assert attackers["hydra"]["first_flagged"] <= 2000
    assert attackers["bulk"]["first_decoyed"] <= 200
    assert attackers["hydra"]["first_decoyed"] <= 1000
    assert attackers["low-and-slow"]["first_flagged"] is None  # 300 is too little
    assert attackers["low-and-slow-long"]["first_decoyed"] <= 1200, attackers["low-and-slow-long"]
    assert attackers["mimic"]["first_decoyed"] <= 2000, attackers["mimic"]
    assert attackers["mimic"]["decoyed_share"] > 0.2, attackers["mimic"]


def test_campaign_through_guard_and_vllm(tmp_path: Path, vllm_url: str) -> None:
    sims = _population(CONFIG)
    result = run_phase("defended", CONFIG, vllm_url, tmp_path, sims)
    honest = result.summary["honest"]
    attackers = result.summary["attackers"]
    assert result.summary["audit_unmatched"] == 0
    assert honest["answered"] > 0.95 * honest["queries"], honest
    assert honest["false_positive_clients"] == [], honest
    assert honest["decoyed_requests"] == 0
    assert attackers["bulk"]["first_flagged"] is not None, attackers["bulk"]
    assert attackers["bulk"]["first_flagged"] <= 200
    assert attackers["bulk"]["first_perturbed"] is not None, attackers["bulk"]
    assert attackers["bulk"]["first_perturbed"] <= 200
    assert attackers["hydra"]["keys_flagged_final"] > 0, attackers["hydra"]
    assert attackers["hydra"]["first_flagged"] <= 1600
    # The hydra is fed decoys for most of its campaign: its collected data is mostly wrong.
    assert attackers["hydra"]["first_decoyed"] is not None, attackers["hydra"]
    assert attackers["hydra"]["first_decoyed"] <= 1000
    assert attackers["hydra"]["wrong_share"] > 0.4, attackers["hydra"]
    assert len(result.pairs["bulk"]) == attackers["bulk"]["collected"]


def test_the_batching_collector_is_counted_in_answers_and_flagged_early() -> None:
    """Its budget counts answers (prompts x n); replayed through the guard's detection it is
    flagged within 2,000 of them."""
    cfg = replace(CONFIG, window_h=1.0)
    queries = _drain(BatchingCollector("batch-bulk", 0, 2000, cfg.window_s))
    assert len(queries) == 125 and all(q.answers == 16 for q in queries)
    assert all(len(q.body["prompt"]) == 4 and q.body["n"] == 4 for q in queries)
    assert len({(p.a, p.b) for q in queries for p in q.problems}) == 500
    sims: list[Simulator] = [BatchingCollector("batch-bulk", 0, 2000, cfg.window_s)]
    summary = replay_summary(sims, replay_detection(sims, campaign_thresholds()))
    attacker = summary["attackers"]["batch-bulk"]
    assert attacker["collected"] == 2000 and attacker["distinct_collected"] == 500
    assert attacker["first_flagged_answers"] is not None
    assert attacker["first_flagged_answers"] <= 2000
    assert attacker["first_flagged_answers"] == 16 * attacker["first_flagged"]
