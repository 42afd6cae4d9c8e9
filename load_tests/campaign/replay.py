"""Offline replay: the guard's own detection code on the simulated clock, without a guard."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from guard_server.config.schema import ActionThresholds, DetectionPolicy
from guard_server.detection.end_users import (
    KEY,
    EndUserScores,
    assess_key,
    decide,
    end_user_of,
    score_with_end_user,
)
from guard_server.detection.scoring import Assessment
from load_tests.campaign.analysis import summarize_attacker, summarize_honest
from load_tests.campaign.config import defended_tier
from load_tests.campaign.driver import Attempt, Outcome
from load_tests.simulators import Query, Reply, Simulator


@dataclass(slots=True)
class Scored:
    """One query as the guard's detection saw it: the key's assessment, the end user's (if
    the query named one and was scored in its scope) and its newcomers' scope's (if the end
    user was new), and the one that decides (``end_users.decide``, as the plan stage)."""

    sim: Simulator
    query: Query
    key: Assessment
    end_user: Assessment | None
    newcomers: Assessment | None = None
    deciding: Assessment = None  # type: ignore[assignment]  # set in __post_init__
    whose: str = KEY  # whose assessment decides: end_users.KEY, END_USER or NEWCOMERS

    def __post_init__(self) -> None:
        decided, self.whose = decide(self.key, self.end_user, self.newcomers)
        assert decided is not None
        self.deciding = decided


def scored_queries(sims: list[Simulator], detection: DetectionPolicy) -> Iterator[Scored]:
    """Every planned query, scored with the guard's own detection code on the simulated clock.

    No guard, no model, no time compression: each query is observed by an in-process
    ``MemoryStore`` whose clock is the query's planned simulated time, and assessed as the
    guard's scoring stage does (a query naming an end user also in the end user's scope:
    ``guard_server.detection.end_users``). Replies are the correct answer, one simulated
    second later. The top-k cap is the defended tier's.
    """
    from guard_server.canonical import canonical_input
    from guard_server.detection.features import extract_features
    from guard_server.openai_fields import Endpoint
    from guard_server.state.memory import MemoryStore

    max_top = max(1, defended_tier().logprobs.max_top)
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0])
    streams = {sim.name: (sim, sim.queries()) for sim in sims}
    pending: list[tuple[float, int, str, Query]] = []
    for order, (name, (_, stream)) in enumerate(streams.items()):
        with contextlib.suppress(StopIteration):
            query = next(stream)
            pending.append((query.at_s, order, name, query))
    order = len(pending)
    heapq.heapify(pending)
    loop = asyncio.new_event_loop()
    try:
        while pending:
            at_s, _, name, query = heapq.heappop(pending)
            sim, stream = streams[name]
            clock[0] = at_s
            endpoint = Endpoint.CHAT if query.endpoint == "chat" else Endpoint.COMPLETIONS
            features = extract_features(canonical_input(endpoint, query.body), max_top)
            end_user = end_user_of(query.body) if detection.end_users.enabled else None
            if end_user is None:
                profile, campaign = loop.run_until_complete(store.observe(query.client, features))
                yield Scored(sim, query, assess_key(detection, profile, campaign), None)
            else:
                scores: EndUserScores = loop.run_until_complete(
                    score_with_end_user(store, query.client, end_user, features, detection)
                )
                yield Scored(sim, query, scores.key, scores.own, scores.newcomers)
            reply = None
            if query.await_reply:
                text = f" The answer is {query.problem.answer}."
                reply = Reply(200, text, at_s + 1.0)
            with contextlib.suppress(StopIteration):
                nxt = stream.send(reply)
                order += 1
                heapq.heappush(pending, (nxt.at_s, order, name, nxt))
    finally:
        loop.close()


def replay_detection(sims: list[Simulator], thresholds: dict[str, float]) -> list[Outcome]:
    """:func:`scored_queries` under the defended tier's detection with ``thresholds``, as
    outcomes: limits are not applied (nothing is throttled) and nothing is decoyed (every
    answer is correct), so this measures detection only."""
    detection = defended_tier().detection
    detection = detection.model_copy(update={"thresholds": ActionThresholds(**thresholds)})
    outcomes: list[Outcome] = []
    for scored in scored_queries(sims, detection):
        sim, query, deciding = scored.sim, scored.query, scored.deciding
        outcome = Outcome(sim.name, sim.kind, sim.role, query, "")
        outcome.attempts.append(Attempt(query.at_s, 200, deciding.score, deciding.action))
        outcome.status = 200
        outcome.texts = [
            f" The answer is {query.problem_of(c).answer}." for c in range(query.answers)
        ]
        outcome.text = outcome.texts[0]
        outcomes.append(outcome)
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
