"""An application behind one key, with its end users (issue 17, item 8): thousands of chat
users over weeks, each named by ``safety_identifier``, and a few abusive ones among them.

Every end user is a :class:`Simulator` of its own (its ``name`` is its end-user id, its one
client is the application's key), so the replay reports each one apart.

- :class:`ChatUser` (honest): joins on some day, comes back in sessions (a daily rate that
  differs a lot between users, at daytime hours), and chats: each session is a conversation
  of a few turns (the app sends the system prompt and the last turns), questions drawn
  Zipf-like from the app's popular questions (which change every week) or new ones,
  ``temperature: 0.7``, no logprobs unless the app shows them. A twentieth are long-lived
  chat users: several long sessions a day, hundreds of turns over the month.
- :class:`ScriptedEndUser` (abusive): a script behind one end user of the app, from some
  day on: a new question at every request, one phrasing, clockwork timing.
- :class:`RotatingEndUser` (abusive): the same script naming a fresh end user at every
  request, to dodge the per-end-user scope.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Any

from guard_server.teacher import task
from load_tests.simulators.base import DistinctProblems, Query, QueryStream, Simulator, chat_body
from load_tests.simulators.timing import clockwork, geometric, think_gap

DAY_S = 86_400.0
SYSTEM_PROMPT = "You are the arithmetic helper of a homework app. Answer briefly."
HISTORY_TURNS = 6
"""Earlier messages (user and assistant) the app sends with each new question."""
POPULAR_POOL = 300
"""The app's popular questions of the week (Zipf-weighted, exponent 1)."""
SCRIPT_TEMPLATE = "Compute {a} + {b} and reply with the number only."


@lru_cache(maxsize=16)
def _popular(seed: int, week: int) -> list[task.Problem]:
    """The week's popular questions: the same for every user of the app (shared seed)."""
    rng = random.Random(f"chat_app:{seed}:popular:{week}")
    return [task.sample_problem(rng, "heldout") for _ in range(POPULAR_POOL)]


_ZIPF = [1.0 / (rank + 1) for rank in range(POPULAR_POOL)]


def _daytime(rng: random.Random) -> float:
    """Seconds into a day at which a session starts: mostly afternoon and evening."""
    return (rng.gauss(16.0, 3.5) % 24.0) * 3600.0


class ChatUser(Simulator):
    """One honest end user of the app behind ``key`` (see the module doc)."""

    kind = "chat_user"
    role = "honest"

    def __init__(
        self,
        name: str,
        key: str,
        seed: int,
        days: float,
        params: dict[str, Any],
        model: str = "teacher",
    ) -> None:
        super().__init__(name, (key,), seed, model)
        rng = self.rng("habits")
        self.days = days
        self.params = params
        self.long_lived = rng.random() < 0.05
        self.joins_day = 0.0 if rng.random() < 0.3 else rng.uniform(0, days)
        if self.long_lived:
            self.sessions_per_day = rng.uniform(2.0, 5.0)
            self.turns_mean = rng.uniform(10.0, 25.0)
        else:
            self.sessions_per_day = min(3.0, rng.lognormvariate(math.log(0.25), 1.0))
            self.turns_mean = rng.uniform(1.5, 6.0)
        self.popular_share = rng.uniform(0.3, 0.8)

    def _session_starts(self, rng: random.Random) -> list[float]:
        """When the user's sessions start: on the days a Poisson process picks, at daytime."""
        starts, day = [], self.joins_day
        while True:
            day += rng.expovariate(self.sessions_per_day)
            if day >= self.days:
                return sorted(starts)
            starts.append(math.floor(day) * DAY_S + _daytime(rng))

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        at_s = 0.0
        for start in self._session_starts(rng):
            at_s = max(start, at_s + 60.0)  # a session starts after the last one ended
            history: list[dict[str, str]] = []
            for _ in range(geometric(rng, self.turns_mean)):
                problem = self._question(rng, at_s)
                messages = [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    *history[-HISTORY_TURNS:],
                    {"role": "user", "content": problem.question},
                ]
                body = chat_body(self.model, messages, self.params)
                body["safety_identifier"] = self.name
                yield Query(self.clients[0], at_s, "chat", body, problem)
                history += [
                    {"role": "user", "content": problem.question},
                    {"role": "assistant", "content": task.render_answer(problem, rng)},
                ]
                at_s += 8.0 + think_gap(rng, 40.0)

    def _question(self, rng: random.Random, at_s: float) -> task.Problem:
        if rng.random() < self.popular_share:
            return rng.choices(_popular(self.seed, int(at_s // (7 * DAY_S))), _ZIPF)[0]
        return task.sample_problem(rng, "heldout")


class ScriptedEndUser(Simulator):
    """An abusive end user: from ``start_day``, ``per_day`` new questions a day in one
    phrasing, ``gap_s`` apart (±2 %), in bursts of ``per_day`` requests a day."""

    kind = "app_scraper"
    role = "attacker"

    def __init__(
        self,
        name: str,
        key: str,
        seed: int,
        days: float,
        params: dict[str, Any],
        start_day: float = 7.0,
        per_day: int = 1500,
        gap_s: float = 6.0,
        model: str = "teacher",
    ) -> None:
        super().__init__(name, (key,), seed, model)
        self.days = days
        self.params = params
        self.start_day = start_day
        self.per_day = per_day
        self.gap_s = gap_s

    def end_user(self, sent: int) -> str:
        """The end-user id the request numbered ``sent`` names."""
        return self.name

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        problems = DistinctProblems(self.rng("problems"))
        day, sent = self.start_day, 0
        while day < self.days:
            for at_s in clockwork(rng, day * DAY_S, self.gap_s, self.per_day, 0.02):
                problem = problems.next(SCRIPT_TEMPLATE)
                messages = [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": problem.question},
                ]
                body = chat_body(self.model, messages, self.params)
                body["safety_identifier"] = self.end_user(sent)
                yield Query(self.clients[0], at_s, "chat", body, problem, collect=True)
                sent += 1
            day += 1.0


class RotatingEndUser(ScriptedEndUser):
    """:class:`ScriptedEndUser` naming a fresh end user at every request."""

    kind = "app_rotator"

    def end_user(self, sent: int) -> str:
        return f"{self.name}-{sent}"


def chat_app_population(
    key: str,
    seed: int,
    end_users: int = 2000,
    days: float = 30.0,
    logprobs: bool = False,
    abusive: bool = True,
    model: str = "teacher",
) -> list[Simulator]:
    """The app's end users: ``end_users`` honest chat users and, with ``abusive``, one
    scripted end user and one rotating one (from day 7, 1,500 requests a day). ``logprobs``:
    the app asks for the tier's maximal ``top_logprobs`` (5) on every request (an app that
    shows confidences), which is extraction evidence for its every end user."""
    params: dict[str, Any] = {"temperature": 0.7, "max_tokens": 32}
    if logprobs:
        params |= {"logprobs": True, "top_logprobs": 5}
    sims: list[Simulator] = [
        ChatUser(f"u{seed}-{i:05d}", key, seed, days, params, model) for i in range(end_users)
    ]
    if abusive:
        sims += [
            ScriptedEndUser(f"scraper{seed}", key, seed, days, params, model=model),
            RotatingEndUser(f"rotator{seed}", key, seed, days, params, model=model),
        ]
    return sims
