"""End users inside one key, offline (issue 17, item 8): a chat application's end users over
simulated weeks, through the guard's own detection code (``replay.scored_queries``), under
the shipped ``application`` tier's detection settings (per-end-user scoring is opt-in).

    python -m load_tests.campaign.endusers --seed 0 [--end-users 2000] [--days 30] [--logprobs]

Reports how many honest end users were ever acted on (by their own scope or because the key
was), and each abusive end user's time to action. Seeds 0 and 1 are for looking at; seed 2
is the hold-out (report it apart, never tune on it).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from guard_server.config.schema import DetectionPolicy, DistinctPromptsRamp
from guard_server.detection.end_users import NEWCOMERS
from guard_server.detection.scoring import ACTIONS, TEXT_ACTIONS
from load_tests.campaign.config import APPLICATION_TIER, defended_tier
from load_tests.campaign.replay import scored_queries
from load_tests.simulators.endusers import DAY_S, chat_app_population

_RANK = {action: rank for rank, action in enumerate(ACTIONS)}
KEY = "chat-app"


@dataclass(slots=True)
class _Actor:
    """What happened to one end user (or one abusive script) over the run."""

    role: str
    kind: str
    requests: int = 0
    first_at_s: float | None = None
    worst: str = "pass"  # the most severe action any of its requests got
    worst_own: str = "pass"  # ... decided by its own scope
    first: dict[str, tuple[int, float]] = field(default_factory=dict)  # action -> (request, s)
    first_own: dict[str, tuple[int, float]] = field(default_factory=dict)  # by its own scope
    first_whose: dict[str, str] = field(default_factory=dict)  # action -> whose scope decided
    worst_newcomers: str = "pass"  # ... decided by its newcomers' scope
    max_own_risk: float = 0.0

    def note(self, at_s: float, action: str, own: str | None, own_risk: float, whose: str) -> None:
        self.requests += 1
        if self.first_at_s is None:
            self.first_at_s = at_s
        if _RANK[action] > _RANK[self.worst]:
            self.worst = action
        if own is not None and _RANK[own] > _RANK[self.worst_own]:
            self.worst_own = own
        self.max_own_risk = max(self.max_own_risk, own_risk)
        if whose == NEWCOMERS and _RANK[action] > _RANK[self.worst_newcomers]:
            self.worst_newcomers = action
        for name in ACTIONS[1 : _RANK[action] + 1]:
            if name not in self.first:
                self.first[name] = (self.requests, at_s - self.first_at_s)
                self.first_whose[name] = whose
        for name in ACTIONS[1 : _RANK[own or "pass"] + 1]:
            self.first_own.setdefault(name, (self.requests, at_s - self.first_at_s))


def run(
    seed: int,
    end_users: int = 2000,
    days: float = 30.0,
    logprobs: bool = False,
    abusive: bool = True,
    detection: DetectionPolicy | None = None,
) -> dict[str, Any]:
    """Replay one chat application's population (on the application tier's ``detection``
    unless given); the report :func:`main` prints."""
    detection = detection or defended_tier(base=APPLICATION_TIER).detection
    sims = chat_app_population(KEY, seed, end_users, days, logprobs, abusive)
    actors = {sim.name: _Actor(sim.role, sim.kind) for sim in sims}
    key_actions: Counter[str] = Counter()
    key_first: dict[str, float] = {}
    key_max = 0.0
    honest_requests = 0
    honest_actions: Counter[str] = Counter()  # what the honest requests got
    # Honest requests of new end users (no history of their own) while the key's action
    # was text-side: what applying the key's action to new end users would have hit.
    new_while_key_text = 0
    for scored in scored_queries(sims, detection):
        at_s, deciding, own = scored.query.at_s, scored.deciding, scored.end_user
        actor = actors[scored.sim.name]
        actor.note(
            at_s,
            deciding.action,
            own.action if own else None,
            own.score if own else 0.0,
            scored.whose,
        )
        key = scored.key
        key_max = max(key_max, key.score)
        if actor.role == "honest":
            honest_requests += 1
            key_actions[key.action] += 1
            honest_actions[deciding.action] += 1
            if scored.newcomers is not None and key.action in TEXT_ACTIONS:
                new_while_key_text += 1
        if key.action != "pass":
            key_first.setdefault(key.action, at_s)
    honest = [a for a in actors.values() if a.role == "honest"]
    return {
        "seed": seed,
        "end_users": end_users,
        "days": days,
        "logprobs": logprobs,
        "abusive_end_users": abusive,
        "honest": {
            "end_users": len(honest),
            "active": sum(a.requests > 0 for a in honest),
            "requests": honest_requests,
            "max_requests_of_one": max((a.requests for a in honest), default=0),
            "ever": {
                name: sum(_RANK[a.worst] >= _RANK[name] for a in honest) for name in ACTIONS[1:]
            },
            "ever_by_own_scope": {
                name: sum(_RANK[a.worst_own] >= _RANK[name] for a in honest) for name in ACTIONS[1:]
            },
            "ever_by_newcomers_scope": {
                name: sum(_RANK[a.worst_newcomers] >= _RANK[name] for a in honest)
                for name in ACTIONS[1:]
            },
            "max_own_risk": round(max((a.max_own_risk for a in honest), default=0.0), 3),
            "requests_by_action": dict(sorted(honest_actions.items())),
            "new_end_user_requests_while_key_text_side": new_while_key_text,
        },
        "key": {
            "max_risk": round(key_max, 3),
            "actions_on_honest_requests": dict(sorted(key_actions.items())),
            "first_day": {name: round(at / DAY_S, 2) for name, at in key_first.items()},
        },
        "abusive": {
            name: {
                "kind": a.kind,
                "requests": a.requests,
                "worst": a.worst,
                "worst_by_own_scope": a.worst_own,
                "worst_by_newcomers_scope": a.worst_newcomers,
                "first": {
                    act: {"request": n, "hours": round(s / 3600, 2), "by": a.first_whose[act]}
                    for act, (n, s) in a.first.items()
                },
                "first_by_own_scope": {
                    act: {"request": n, "hours": round(s / 3600, 2)}
                    for act, (n, s) in a.first_own.items()
                },
            }
            for name, a in actors.items()
            if a.role == "attacker"
        },
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m load_tests.campaign.endusers``."""
    ap = argparse.ArgumentParser(prog="python -m load_tests.campaign.endusers", description=(
        "A chat application's end users (safety_identifier) over simulated days, through "
        "the guard's detection code: honest end users acted on, abusive ones' time to "
        "action."))  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="0 and 1: looked at; 2: hold-out")
    ap.add_argument("--end-users", type=int, default=2000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--logprobs", action="store_true",
                    help="the app asks for top_logprobs 5 on every request")  # fmt: skip
    ap.add_argument("--no-abusive", action="store_true", help="honest end users only")
    ap.add_argument("--ramp", help="START,FULL: the tier's detection.distinct_prompts instead")
    args = ap.parse_args(argv)
    detection = defended_tier(base=APPLICATION_TIER).detection
    if args.ramp:
        start, full = (int(bound) for bound in args.ramp.split(","))
        ramp = DistinctPromptsRamp(start=start, full=full)
        detection = detection.model_copy(update={"distinct_prompts": ramp})
    report = run(
        args.seed, args.end_users, args.days, args.logprobs, not args.no_abusive, detection
    )
    report["distinct_prompts_ramp"] = list(detection.distinct_prompts.bounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
