"""What a phase measured: the guard's decisions per attempt (audit log, admin API), and the
summaries of attackers, honest users and timeline fidelity."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from guard_server.detection.scoring import ACTIONS
from guard_server.teacher import task
from load_tests.campaign.config import ADMIN_KEY
from load_tests.campaign.driver import Attempt, Outcome
from load_tests.simulators import Query, Simulator


def action_for(risk: float | None, thresholds: dict[str, float]) -> str:
    """The action a risk score maps to (as ``guard_server.detection.scoring.assess``)."""
    action = "pass"
    if risk is None:
        return action
    for name in ACTIONS[1:]:
        if risk >= thresholds[name]:
            action = name
    return action


def attach_audit(outcomes: list[Outcome], audit: Path, thresholds: dict[str, float]) -> int:
    """Give every attempt the guard's decision from the audit log; return unmatched attempts."""
    entries: dict[tuple[str, str], deque[dict[str, Any]]] = defaultdict(deque)
    if audit.exists():
        for line in audit.read_text().splitlines():
            record = orjson.loads(line)
            entries[(record["client"], record["request_hash"])].append(record)
    unmatched = 0
    sent = [o for o in outcomes if o.attempts]
    for outcome in sorted(sent, key=lambda o: o.finished_s):
        queue = entries.get((outcome.query.client, outcome.body_hash))
        for attempt in outcome.attempts:
            if not queue:
                unmatched += 1
                continue
            record = queue.popleft()
            attempt.risk = record.get("risk")
            attempt.action = record["action"]
            if attempt.status != 200 and "assessed" not in record:
                # A guard from before the plan stage logged ``pass`` for requests refused
                # after scoring; newer ones log the action taken (``assessed``: the score's).
                attempt.action = action_for(attempt.risk, thresholds)
    return unmatched


async def admin_reports(base_url: str, clients: list[str]) -> dict[str, dict[str, Any]]:
    """``GET /admin/clients/{id}`` for every client."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(client: str) -> tuple[str, dict[str, Any]]:
            async with sem, session.get(f"{base_url}/admin/clients/{client}") as response:
                return client, await response.json()

        return dict(await asyncio.gather(*(one(c) for c in clients)))


def _flagged(attempt: Attempt) -> bool:
    return attempt.action != "pass"


def _first_index(attempts: list[Attempt], predicate: Any) -> int | None:
    for i, attempt in enumerate(attempts, 1):
        if predicate(attempt):
            return i
    return None


def _answers_until(sent: list[tuple[Attempt, int]], predicate: Any) -> int | None:
    """The answers asked for (prompts x n per request) up to and including the first
    attempt that satisfies ``predicate``."""
    total = 0
    for attempt, answers in sent:
        total += answers
        if predicate(attempt):
            return total
    return None


def summarize_attacker(
    sim: Simulator, outcomes: list[Outcome], admin: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Detection, poisoning and collection numbers for one attacker."""
    sent = sorted(
        ((a, o.query.answers) for o in outcomes for a in o.attempts),
        key=lambda pair: pair[0].sent_s,
    )
    attempts = [a for a, _ in sent]
    answered = [o for o in outcomes if o.status == 200]
    collected = [o for o in answered if o.query.collect]
    pairs = [(o, problem, text) for o in collected for problem, text in o.pairs()]
    actions = [o.final.action for o, _, _ in pairs if o.final]
    n = max(1, len(pairs))
    reports = [admin[c] for c in sim.clients if c in admin]
    final_actions = [r.get("action", "pass") for r in reports]
    if not reports:  # no admin API (offline replay): each key's last decision
        last: dict[str, str] = {}
        for outcome in sorted(outcomes, key=lambda o: o.final.sent_s if o.final else 0.0):
            if outcome.final:
                last[outcome.query.client] = outcome.final.action
        final_actions = list(last.values())
    return {
        "actor": sim.name,
        "kind": sim.kind,
        "keys": len(sim.clients),
        "planned": len(outcomes),
        "requests": len(attempts),
        "answered": len(answered),
        "throttled": sum(a.status == 429 for a in attempts),
        "blocked": sum(a.status == 403 for a in attempts),
        "unsent": sum(not o.attempts for o in outcomes),
        "errors": _errors(outcomes),
        "first_flagged": _first_index(attempts, _flagged),
        "first_flagged_answers": _answers_until(sent, _flagged),
        "first_perturbed": _first_index(attempts, lambda a: a.action in ("perturb", "decoy")),
        "first_decoyed": _first_index(attempts, lambda a: a.action == "decoy"),
        "collected": len(pairs),
        "distinct_collected": len({(p.a, p.b) for _, p, _ in pairs}),
        "decoyed_share": sum(a == "decoy" for a in actions) / n,
        "perturbed_share": sum(a == "perturb" for a in actions) / n,
        "wrong_share": sum(not task.check(p, text) for _, p, text in pairs) / n,
        "keys_flagged_final": sum(a != "pass" for a in final_actions),
        "final_actions": {a: final_actions.count(a) for a in sorted(set(final_actions))},
        "final_score_max": max((r.get("score", 0.0) for r in reports), default=0.0),
        "final_signals": max(reports, key=lambda r: r.get("score", 0.0)).get("signals", {})
        if reports
        else {},
    }


def summarize_honest(
    sims: list[Simulator], outcomes: list[Outcome], admin: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """False positives and answer accuracy of the honest population."""
    by_client: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_client[outcome.query.client].append(outcome)
    clients = [c for sim in sims for c in sim.clients]
    flagged, throttled, decoyed, fp = set(), set(), set(), set()
    max_risk, max_risk_client = 0.0, ""
    for client in clients:
        attempts = [a for o in by_client[client] for a in o.attempts]
        if (
            any(_flagged(a) for a in attempts)
            or admin.get(client, {}).get("action", "pass") != "pass"
        ):
            flagged.add(client)
        if any(a.status == 429 for a in attempts):
            throttled.add(client)
        if any(a.action == "decoy" for a in attempts):
            decoyed.add(client)
        for attempt in attempts:
            if attempt.risk is not None and attempt.risk > max_risk:
                max_risk, max_risk_client = attempt.risk, client
    fp = flagged | throttled | decoyed
    answered = [o for o in outcomes if o.status == 200]
    correct = sum(task.check(o.query.problem, o.text or "") for o in answered)
    batch = {c for sim in sims if sim.kind == "batch" for c in sim.clients}
    return {
        "clients": len(clients),
        "batch_clients": len(batch),
        "flagged": len(flagged),
        "throttled": len(throttled),
        "decoyed_clients": len(decoyed),
        "false_positive_clients": sorted(fp),
        "false_positive_rate": len(fp) / max(1, len(clients)),
        "requests": sum(len(o.attempts) for o in outcomes),
        "queries": len(outcomes),
        "answered": len(answered),
        "errors": _errors(outcomes),
        "unsent": sum(not o.attempts for o in outcomes),
        "decoyed_requests": sum(a.action == "decoy" for o in outcomes for a in o.attempts),
        "accuracy": correct / max(1, len(answered)),
        "accuracy_interactive": _accuracy([o for o in answered if o.query.client not in batch]),
        "accuracy_single_turn": _accuracy([o for o in answered if not _multi_turn(o.query)]),
        "accuracy_multi_turn": _accuracy([o for o in answered if _multi_turn(o.query)]),
        "accuracy_batch": _accuracy([o for o in answered if o.query.client in batch]),
        "max_risk": max_risk,
        "max_risk_client": max_risk_client,
        "max_risk_signals": admin.get(max_risk_client, {}).get("signals", {}),
    }


def _errors(outcomes: list[Outcome]) -> dict[str, Any]:
    """Failed queries by status, with one example message each."""
    failed = [o for o in outcomes if o.status not in (0, 200)]
    by_status: dict[str, Any] = {}
    for outcome in failed:
        entry = by_status.setdefault(str(outcome.status), {"count": 0, "example": outcome.error})
        entry["count"] += 1
    return by_status


def _multi_turn(query: Query) -> bool:
    return len(query.body.get("messages", ())) > 1


def _accuracy(outcomes: list[Outcome]) -> float | None:
    if not outcomes:
        return None
    return sum(task.check(o.query.problem, o.text or "") for o in outcomes) / len(outcomes)


def timing_summary(outcomes: list[Outcome], real_s: float) -> dict[str, Any]:
    """How faithful the compressed timeline was: request rate, latency, lateness."""
    attempts = [a for o in outcomes for a in o.attempts]
    latencies = sorted(o.latency_s for o in outcomes if o.attempts)
    late = sorted(
        max(0.0, o.attempts[0].sent_s - o.planned_real_s)
        for o in outcomes
        if o.attempts and len(o.attempts) == 1 and not o.query.await_reply
    )

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else 0.0

    return {
        "real_seconds": round(real_s, 1),
        "requests": len(attempts),
        "requests_per_real_s": round(len(attempts) / max(real_s, 1e-9), 1),
        "latency_p50_s": pct(latencies, 0.5),
        "latency_p99_s": pct(latencies, 0.99),
        "open_loop_lateness_p50_s": pct(late, 0.5),
        "open_loop_lateness_p99_s": pct(late, 0.99),
    }
