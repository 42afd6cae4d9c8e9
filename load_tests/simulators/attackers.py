"""Extraction attackers: each collects (question, answer) pairs to train a copy of the teacher."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from guard_server.teacher import task
from load_tests.simulators.base import (
    DistinctProblems,
    Query,
    QueryStream,
    Simulator,
    ask,
    chat_body,
    completion_body,
)
from load_tests.simulators.timing import clockwork, geometric, think_gap

HYDRA_SYSTEM_PROMPT = "Answer the question."
"""The scaffolding every hydra key sends (one script behind all of them)."""


class _Attacker(Simulator):
    """An attacker with a query budget spread over a simulated window."""

    role = "attacker"

    def __init__(
        self,
        name: str,
        clients: tuple[str, ...],
        seed: int,
        budget: int,
        window_s: float,
        model: str,
    ) -> None:
        super().__init__(name, clients, seed, model)
        if budget < 1:
            raise ValueError("the query budget must be at least 1")
        self.budget = budget
        self.window_s = window_s

    @abstractmethod
    def rate_per_min(self) -> float:
        """The mean request rate (per simulated minute) of its busiest key."""


class BulkExtractor(_Attacker):
    """High volume from one key: distinct problems sweeping the input space, one template,
    greedy decoding, the largest ``logprobs`` the API might give, sent by a script at a fixed
    rate just under the static limit."""

    kind = "bulk"

    def __init__(
        self,
        name: str,
        seed: int,
        budget: int,
        window_s: float,
        model: str = "teacher",
        rate_per_min: float = 40.0,
        top_logprobs: int = 20,
    ) -> None:
        super().__init__(name, (name,), seed, budget, window_s, model)
        self.rate = rate_per_min
        self.params: dict[str, Any] = {
            "max_tokens": 32,
            "temperature": 0,
            "logprobs": top_logprobs,
        }

    def rate_per_min(self) -> float:
        return self.rate

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        problems = DistinctProblems(self.rng("problems"))
        start = 0.02 * self.window_s
        for t in clockwork(rng, start, 60.0 / self.rate, self.budget, jitter=0.02):
            problem = problems.next(task.QUESTION_TEMPLATES[0])
            body = completion_body(self.model, problem.question, self.params)
            yield Query(self.name, t, "completions", body, problem, collect=True)


class BatchingCollector(_Attacker):
    """The bulk collector that batches: ``/v1/completions`` with ``prompt`` a list of
    ``prompts`` distinct problems and ``n`` samples of each (sampled: vLLM wants ``n`` = 1
    when greedy), so one request brings prompts x n answers; otherwise the bulk's habits (one
    template, the largest ``logprobs``). Its budget counts answers; it sends clockwork requests at
    ``rate_per_min`` prompts a minute (what a guard that counts prompts sees)."""

    kind = "batch_bulk"

    def __init__(
        self,
        name: str,
        seed: int,
        budget: int,
        window_s: float,
        model: str = "teacher",
        prompts: int = 4,
        n: int = 4,
        rate_per_min: float = 40.0,
        temperature: float = 0.7,
        top_logprobs: int = 20,
    ) -> None:
        super().__init__(name, (name,), seed, budget, window_s, model)
        self.prompts = prompts
        self.rate = rate_per_min
        self.params: dict[str, Any] = {
            "max_tokens": 32,
            "temperature": temperature,
            "n": n,
            "logprobs": top_logprobs,
        }

    def rate_per_min(self) -> float:
        return self.rate

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        problems = DistinctProblems(self.rng("problems"))
        per_request = self.prompts * self.params["n"]
        requests = -(-self.budget // per_request)
        start = 0.02 * self.window_s
        gap = 60.0 * self.prompts / self.rate
        for t in clockwork(rng, start, gap, requests, jitter=0.02):
            batch = tuple(problems.next(task.QUESTION_TEMPLATES[0]) for _ in range(self.prompts))
            prompt = [task.completion_prompt(p.question) for p in batch]
            body = {"model": self.model, "prompt": prompt, **self.params}
            yield Query(self.name, t, "completions", body, batch[0], collect=True, batch=batch)


class LowAndSlow(_Attacker):
    """One key, distinct problems, well under the static limits: Poisson arrivals spread over
    the whole window, every phrasing, chat, no logprobs (the text alone distils)."""

    kind = "low_and_slow"

    def __init__(
        self, name: str, seed: int, budget: int, window_s: float, model: str = "teacher"
    ) -> None:
        super().__init__(name, (name,), seed, budget, window_s, model)
        self.mean_gap_s = 0.9 * window_s / budget

    def rate_per_min(self) -> float:
        return 60.0 / self.mean_gap_s

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        problems = DistinctProblems(self.rng("problems"))
        t = 0.0
        for _ in range(self.budget):
            t += rng.expovariate(1.0 / self.mean_gap_s)
            problem = problems.next(rng.choice(task.QUESTION_TEMPLATES))
            messages = [{"role": "user", "content": problem.question}]
            body = chat_body(self.model, messages, {"temperature": 0})
            yield Query(self.name, t, "chat", body, problem, collect=True)


class Hydra(_Attacker):
    """One campaign over many keys: the same script (system prompt, template, parameters,
    maximal logprobs) rotating through its keys at a fixed overall rate, so that each key
    stays low-volume while together they sweep distinct problems."""

    kind = "hydra"

    def __init__(
        self,
        name: str,
        seed: int,
        budget: int,
        window_s: float,
        model: str = "teacher",
        keys: int = 60,
        system_prompt: str | None = None,
        top_logprobs: int = 20,
    ) -> None:
        if keys < 2:
            raise ValueError("a hydra needs several keys")
        clients = tuple(f"{name}-{i:03d}" for i in range(keys))
        super().__init__(name, clients, seed, budget, window_s, model)
        self.gap_s = 0.8 * window_s / budget
        self.system_prompt = system_prompt
        self.params: dict[str, Any] = {
            "max_tokens": 32,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": top_logprobs,
        }

    def rate_per_min(self) -> float:
        return 60.0 / (self.gap_s * len(self.clients))

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        problems = DistinctProblems(self.rng("problems"))
        scaffold = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        start = 0.05 * self.window_s
        times = clockwork(rng, start, self.gap_s, self.budget, jitter=0.02)
        for i, t in enumerate(times):
            problem = problems.next(task.QUESTION_TEMPLATES[0])
            messages = [*scaffold, {"role": "user", "content": problem.question}]
            body = chat_body(self.model, messages, self.params)
            client = self.clients[i % len(self.clients)]
            yield Query(client, t, "chat", body, problem, collect=True)


class Mimic(_Attacker):
    """One key that hides its sweep in honest-looking traffic: a share of its requests
    re-ask a small working set (as users do), phrasings vary, timing is bursty sessions with
    human-like pauses, parameters are a common honest habit (greedy, nothing else)."""

    kind = "mimic"

    def __init__(
        self,
        name: str,
        seed: int,
        budget: int,
        window_s: float,
        model: str = "teacher",
        blend: float = 0.4,
        working_set: int = 20,
        sessions: int = 16,
    ) -> None:
        super().__init__(name, (name,), seed, budget, window_s, model)
        self.blend = blend
        rng = self.rng("working-set")
        self.working_set = [task.sample_problem(rng, "train") for _ in range(working_set)]
        self.sessions = sessions
        self.think_s = 0.6 * window_s / budget
        self.idle_s = 0.4 * window_s / sessions

    def rate_per_min(self) -> float:
        return 60.0 / self.think_s

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        problems = DistinctProblems(self.rng("problems"))
        weights = [1.0 / (i + 1) for i in range(len(self.working_set))]
        t, left_in_session = 0.0, 0
        for _ in range(self.budget):
            if left_in_session == 0:
                t += rng.expovariate(1.0 / self.idle_s)
                left_in_session = geometric(rng, self.budget / self.sessions)
            template = rng.choice(task.QUESTION_TEMPLATES)
            if rng.random() < self.blend:
                problem = ask(rng.choices(self.working_set, weights)[0], template)
            else:
                problem = problems.next(template)
            messages = [{"role": "user", "content": problem.question}]
            body = chat_body(self.model, messages, {"temperature": 0})
            yield Query(self.name, t, "chat", body, problem, collect=True)
            t += think_gap(rng, self.think_s)
            left_in_session -= 1


def attackers(
    seed: int, budget: int, window_s: float, model: str = "teacher", hydra_keys: int = 60
) -> list[_Attacker]:
    """One attacker of each kind, all with the same query budget."""
    return [
        BulkExtractor("bulk", seed, budget, window_s, model),
        LowAndSlow("low-and-slow", seed, budget, window_s, model),
        Hydra("hydra", seed, budget, window_s, model, keys=hydra_keys),
        Mimic("mimic", seed, budget, window_s, model),
        BatchingCollector("batch-bulk", seed, budget, window_s, model),
    ]
