"""Offline replay: the guard's own detection code on the simulated clock, without a guard."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import defaultdict
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
            assessment = assess(profile, campaign, thresholds, distinct_ramp)
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
