"""Honest traffic: interactive users with their own habits, and heavy but honest batch jobs."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from guard_server.teacher import task
from load_tests.simulators.base import (
    Endpoint,
    Query,
    QueryStream,
    Simulator,
    ask,
    chat_body,
    completion_body,
)
from load_tests.simulators.timing import (
    clockwork,
    geometric,
    poisson_count,
    session_starts,
    think_gap,
)

MAX_TURNS = 3
"""User turns in one multi-turn chat before the user starts a new conversation."""

# Sampling-parameter habits of interactive users, with their shares. Most send the SDK's
# defaults (no sampling fields at all).
_PARAM_HABITS: tuple[tuple[float, dict[str, Any]], ...] = (
    (0.55, {}),
    (0.20, {"temperature": 0}),
    (0.10, {"temperature": 0.7}),
    (0.10, {"max_tokens": 64}),
    (0.05, {"temperature": 0, "max_tokens": 32}),
)


@dataclass(frozen=True, slots=True)
class Habits:
    """How one user asks: favourite phrasings, endpoint, parameters, logprobs, pace."""

    templates: tuple[str, ...]
    template_weights: tuple[float, ...]
    endpoint: Endpoint
    params: dict[str, Any]
    logprob_rate: float  # share of requests asking for logprobs
    top_logprobs: int  # small top-k when they do
    multi_turn_rate: float  # share of sessions that are multi-turn chats
    think_s: float  # mean pause between requests of a session
    per_session: float  # mean requests per session

    @classmethod
    def draw(cls, rng: random.Random) -> Habits:
        """A random but plausible set of habits."""
        favourites = rng.sample(task.QUESTION_TEMPLATES, rng.choice((1, 1, 2, 2, 3)))
        weights = tuple(sorted((rng.random() + 0.2 for _ in favourites), reverse=True))
        endpoint: Endpoint = "chat" if rng.random() < 0.85 else "completions"
        habit = rng.random()
        params: dict[str, Any] = {}
        for share, candidate in _PARAM_HABITS:
            habit -= share
            if habit < 0:
                params = dict(candidate)
                break
        uses_logprobs = rng.random() < 0.12
        return cls(
            templates=tuple(favourites),
            template_weights=weights,
            endpoint=endpoint,
            params=params,
            logprob_rate=rng.uniform(0.1, 0.4) if uses_logprobs else 0.0,
            top_logprobs=rng.choice((1, 2, 3)),
            multi_turn_rate=rng.uniform(0.1, 0.5) if endpoint == "chat" else 0.0,
            think_s=rng.uniform(10.0, 60.0),
            per_session=rng.uniform(2.0, 8.0),
        )


def logprob_params(endpoint: Endpoint, top: int) -> dict[str, Any]:
    """The fields that ask for ``top`` logprobs per position on ``endpoint``."""
    return {"logprobs": True, "top_logprobs": top} if endpoint == "chat" else {"logprobs": top}


class HonestUser(Simulator):
    """An interactive user of the teacher's task.

    The user has a small working set of problems (repeats are common: Zipf-weighted picks),
    a few favourite phrasings, one endpoint and one parameter habit (mostly the SDK's
    defaults). Activity comes in sessions at random times of the window; inside a session
    the user reads each answer, then pauses (log-normal think time) before the next
    question. Some sessions are multi-turn chats that carry the earlier turns along; a few
    users sometimes ask for logprobs with a small top-k.
    """

    kind = "honest"
    role = "honest"

    def __init__(
        self,
        name: str,
        seed: int,
        window_s: float,
        model: str = "teacher",
        mean_requests: float = 25.0,
    ) -> None:
        super().__init__(name, (name,), seed, model)
        self.window_s = window_s
        self.mean_requests = mean_requests
        rng = self.rng("habits")
        self.habits = Habits.draw(rng)
        size = min(60, max(3, round(rng.lognormvariate(math.log(12), 0.6))))
        self.working_set = [task.sample_problem(rng) for _ in range(size)]
        self._weights = [1.0 / (i + 1) for i in range(size)]

    def _body(
        self, problem: task.Problem, history: list[dict[str, str]], rng: random.Random
    ) -> dict[str, Any]:
        habits = self.habits
        params = dict(habits.params)
        if habits.logprob_rate and rng.random() < habits.logprob_rate:
            params.update(logprob_params(habits.endpoint, habits.top_logprobs))
        if habits.endpoint == "completions":
            return completion_body(self.model, problem.question, params)
        return chat_body(
            self.model, [*history, {"role": "user", "content": problem.question}], params
        )

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        habits = self.habits
        sessions = max(1, 1 + poisson_count(rng, self.mean_requests / habits.per_session - 1))
        now = 0.0
        for start in session_starts(rng, sessions, self.window_s):
            t = max(start, now)
            conversation = rng.random() < habits.multi_turn_rate
            history: list[dict[str, str]] = []
            for _ in range(geometric(rng, habits.per_session)):
                problem = rng.choices(self.working_set, self._weights)[0]
                problem = ask(problem, rng.choices(habits.templates, habits.template_weights)[0])
                if len(history) >= 2 * MAX_TURNS:
                    history = []
                body = self._body(problem, history, rng)
                reply = yield Query(self.name, t, habits.endpoint, body, problem, await_reply=True)
                now = reply.at_s if reply is not None else t
                if conversation and reply is not None and reply.text is not None:
                    history = [
                        *body["messages"],
                        {"role": "assistant", "content": reply.text.strip()},
                    ]
                else:
                    history = []
                t = now + think_gap(rng, habits.think_s)
            now = t


class BatchUser(Simulator):
    """A heavy but honest client: a nightly regression suite re-run over a fixed problem set.

    Each run sends the whole suite (the same prompts every time) from a rate-limited job
    runner at a steady pace, with greedy decoding and no logprobs.
    """

    kind = "batch"
    role = "honest"

    def __init__(
        self,
        name: str,
        seed: int,
        window_s: float,
        model: str = "teacher",
        suite_size: int = 400,
        runs: int = 3,
        rate_per_min: float = 40.0,
    ) -> None:
        super().__init__(name, (name,), seed, model)
        rng = self.rng("suite")
        self.window_s = window_s
        self.suite = [task.sample_problem(rng) for _ in range(suite_size)]
        self.runs = runs
        self.gap_s = 60.0 / rate_per_min
        if suite_size * self.gap_s * runs > window_s:
            raise ValueError(f"{name}: {runs} runs of {suite_size} do not fit the window")
        self.params = {"temperature": 0, "max_tokens": 32}

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        for run in range(self.runs):
            start = (
                self.window_s * run / self.runs + rng.uniform(0, 0.1) * self.window_s / self.runs
            )
            times = clockwork(rng, start, self.gap_s, len(self.suite), jitter=0.05)
            for t, problem in zip(times, self.suite, strict=True):
                body = completion_body(self.model, problem.question, self.params)
                yield Query(self.name, t, "completions", body, problem)


def honest_population(
    users: int,
    batch_users: int,
    seed: int,
    window_s: float,
    model: str = "teacher",
    mean_requests: float = 25.0,
    suite_size: int = 400,
    suite_runs: int = 3,
) -> list[Simulator]:
    """``users`` interactive users and ``batch_users`` batch jobs, all different."""
    population: list[Simulator] = [
        HonestUser(f"honest-{i:04d}", seed, window_s, model, mean_requests) for i in range(users)
    ]
    rng = random.Random(f"batch-sizes:{seed}")
    population += [
        BatchUser(
            f"batch-{i:02d}",
            seed,
            window_s,
            model,
            suite_size=round(suite_size * rng.uniform(0.5, 1.25)),
            runs=suite_runs,
        )
        for i in range(batch_users)
    ]
    return population
