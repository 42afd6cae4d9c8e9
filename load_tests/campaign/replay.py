"""Offline replay: the guard's own detection code on the simulated clock, without a guard."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import Counter, defaultdict
from typing import Any

from load_tests.campaign.analysis import summarize_attacker, summarize_honest
from load_tests.campaign.config import defended_tier
from load_tests.campaign.driver import Attempt, Outcome
from load_tests.simulators import Query, Reply, Simulator


def replay_detection(sims: list[Simulator], thresholds: dict[str, float]) -> list[Outcome]:
    """Score every planned query with the guard's own detection code on the simulated clock.

    No guard, no model, no time compression: each query is observed by an in-process
    ``MemoryStore`` whose clock is the query's planned simulated time, and assessed with
    ``guard_server.detection.scoring.assess``. Replies are the correct answer, one simulated
    second later. Limits are not applied (nothing is throttled) and nothing is decoyed, so
    this measures detection only. The top-k cap and the distinct-prompts ramp are the
    defended tier's, as in the guard.
    """
    from guard_server.canonical import canonical_input
    from guard_server.detection.features import extract_features
    from guard_server.detection.scoring import assess
    from guard_server.openai_fields import Endpoint
    from guard_server.state.memory import MemoryStore

    tier = defended_tier()
    max_top = tier.logprobs.max_top
    distinct_ramp = tier.detection.distinct_prompts.bounds
    evidence_min = tier.detection.evidence_min
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0])
    streams = {sim.name: (sim, sim.queries()) for sim in sims}
    pending: list[tuple[float, int, str, Query]] = []
    for order, (name, (_, stream)) in enumerate(streams.items()):
        with contextlib.suppress(StopIteration):
            query = next(stream)
            pending.append((query.at_s, order, name, query))
    outcomes: list[Outcome] = []
    order = len(pending)
    loop = asyncio.new_event_loop()
    try:
        heapq.heapify(pending)
        while pending:
            at_s, _, name, query = heapq.heappop(pending)
            sim, stream = streams[name]
            clock[0] = at_s
            endpoint = Endpoint.CHAT if query.endpoint == "chat" else Endpoint.COMPLETIONS
            features = extract_features(canonical_input(endpoint, query.body), max(1, max_top))
            profile, campaign = loop.run_until_complete(store.observe(query.client, features))
            assessment = assess(profile, campaign, thresholds, distinct_ramp, evidence_min)
            outcome = Outcome(sim.name, sim.kind, sim.role, query, "")
            outcome.attempts.append(Attempt(at_s, 200, assessment.score, assessment.action))
            outcome.status = 200
            outcome.texts = [
                f" The answer is {query.problem_of(c).answer}." for c in range(query.answers)
            ]
            outcome.text = outcome.texts[0]
            outcomes.append(outcome)
            reply = Reply(200, outcome.text, at_s + 1.0) if query.await_reply else None
            with contextlib.suppress(StopIteration):
                nxt = stream.send(reply)
                order += 1
                heapq.heappush(pending, (nxt.at_s, order, name, nxt))
    finally:
        loop.close()
    return outcomes


def replay_summary(sims: list[Simulator], outcomes: list[Outcome]) -> dict[str, Any]:
    """The detection part of a phase summary, from :func:`replay_detection`."""
    by_actor: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_actor[outcome.actor].append(outcome)
    honest = [s for s in sims if s.role == "honest"]
    return {
        "phase": "replay",
        "honest": summarize_honest(honest, [o for s in honest for o in by_actor[s.name]], {}),
        "attackers": {
            s.name: summarize_attacker(s, by_actor[s.name], {})
            for s in sims
            if s.role == "attacker"
        },
    }


def _actor_row(sim: Simulator, outcomes: list[Outcome]) -> dict[str, Any]:
    """When one actor (honest or not) was first flagged, perturbed and decoyed, and how much."""
    summary = summarize_attacker(sim, outcomes, {})
    attempts = [a for o in outcomes for a in o.attempts]
    return {
        "role": sim.role,
        "kind": sim.kind,
        "requests": len(attempts),
        "first_flagged": summary["first_flagged"],
        "first_perturbed": summary["first_perturbed"],
        "first_decoyed": summary["first_decoyed"],
        "decoyed_requests": sum(a.action == "decoy" for a in attempts),
        "actions": dict(sorted(Counter(a.action for a in attempts).items())),
        "max_risk": round(max((a.risk or 0.0 for a in attempts), default=0.0), 3),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m load_tests.campaign.replay``: detection on simulated populations, offline."""
    import argparse
    import json
    from dataclasses import replace

    from load_tests.campaign.config import CampaignConfig, campaign_thresholds, population
    from load_tests.simulators import Application, EvaluationRun

    ap = argparse.ArgumentParser(prog="python -m load_tests.campaign.replay", description=(
        "Replay simulated populations through the guard's detection code (no guard, no "
        "model) and print who was flagged, perturbed and decoyed, and when."))  # fmt: skip
    ap.add_argument(
        "--population",
        default="campaign,heavy",
        help="comma-separated: campaign (CampaignConfig's honest users, batch jobs "
        "and attackers), heavy (an evaluation run and an application key)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, help="queries per attacker")
    ap.add_argument("--window-h", type=float, help="simulated hours of the campaign")
    ap.add_argument("--json", action="store_true", help="print the full summary as JSON")
    args = ap.parse_args(argv)  # fmt: skip
    cfg = replace(CampaignConfig(), seed=args.seed)
    if args.budget:
        cfg = replace(cfg, budget=args.budget)
    if args.window_h:
        cfg = replace(cfg, window_h=args.window_h)
    kinds = args.population.split(",")
    sims: list[Simulator] = []
    if "campaign" in kinds:
        sims += population(cfg)
    if "heavy" in kinds:
        sims += [EvaluationRun("evaluation", args.seed), Application("application", args.seed)]
    outcomes = replay_detection(sims, campaign_thresholds())
    by_actor: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_actor[outcome.actor].append(outcome)
    rows = {
        s.name: _actor_row(s, by_actor[s.name])
        for s in sims
        if s.role == "attacker" or s.kind in ("evaluation", "application", "batch")
    }
    summary = replay_summary(sims, outcomes)
    honest = summary["honest"]
    if args.json:
        print(json.dumps({"honest": honest, "actors": rows}, indent=2, default=str))
        return
    print(f"honest: {honest['clients']} clients, {honest['requests']} requests, flagged "
          f"{honest['flagged']}, decoyed clients {honest['decoyed_clients']}, decoyed requests "
          f"{honest['decoyed_requests']}, max risk {honest['max_risk']:.3f} "
          f"({honest['max_risk_client']})")  # fmt: skip
    print("| actor | role | requests | first flagged | first perturb+ | first decoy | "
          "decoyed requests | max risk | actions |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, row in rows.items():
        cells = [row[k] for k in ("role", "requests", "first_flagged", "first_perturbed",
                                  "first_decoyed", "decoyed_requests", "max_risk")]  # fmt: skip
        shown = " | ".join("never" if c is None else str(c) for c in cells)
        print(f"| {name} | {shown} | {row['actions']} |")


if __name__ == "__main__":
    main()
