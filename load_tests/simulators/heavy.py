"""Heavy honest clients no attacker simulator resembles by volume alone (issue 17's table).

- :class:`EvaluationRun`: a researcher evaluating the model on thousands of distinct
  held-out questions, greedy, ``top_logprobs: 5`` (the default tier's maximum), a few
  requests in flight at a time.
- :class:`Application`: an application behind one key serving many end users: questions
  drawn Zipf-like from a pool (popular ones repeat, the pool moves on over time), a fifth of
  them two-turn chats, ``temperature: 0.7``, no logprobs, Poisson arrivals.
"""

from __future__ import annotations

import heapq

from guard_server.teacher import task
from load_tests.simulators.base import Query, QueryStream, Simulator, chat_body
from load_tests.simulators.timing import poisson_arrivals


class EvaluationRun(Simulator):
    """``questions`` distinct held-out problems (each in its own phrasing), asked by
    ``concurrency`` workers that each send the next question when the previous answer is in
    (latency log-normal around ``latency_s``), from ``start_s``."""

    kind = "evaluation"
    role = "honest"

    def __init__(
        self,
        name: str,
        seed: int,
        questions: int = 2000,
        concurrency: int = 4,
        latency_s: float = 1.5,
        start_s: float = 0.0,
        top_logprobs: int = 5,
        model: str = "teacher",
    ) -> None:
        super().__init__(name, (name,), seed, model)
        self.problems = task.make_problems(questions, seed, "heldout")
        self.concurrency = concurrency
        self.latency_s = latency_s
        self.start_s = start_s
        self.params = {"temperature": 0, "max_tokens": 32, "logprobs": True,
                       "top_logprobs": top_logprobs}  # fmt: skip

    def queries(self) -> QueryStream:
        rng = self.rng("latency")
        workers = [(self.start_s + rng.uniform(0, 0.2), w) for w in range(self.concurrency)]
        heapq.heapify(workers)
        for problem in self.problems:
            at_s, worker = heapq.heappop(workers)
            messages = [{"role": "user", "content": problem.question}]
            body = chat_body(self.model, messages, self.params)
            yield Query(self.name, at_s, "chat", body, problem)
            heapq.heappush(workers, (at_s + self.latency_s * rng.lognormvariate(0, 0.3), worker))


class Application(Simulator):
    """``requests`` requests at ``rate_per_min`` (Poisson). Questions come Zipf-weighted
    (exponent 1) from a pool of ``pool`` problems, a new pool every ``pool_every`` requests
    (new questions, same kind of traffic); ``chat_share`` of the conversations are two-turn
    chats whose second turn carries the first turn and its answer."""

    kind = "application"
    role = "honest"

    def __init__(
        self,
        name: str,
        seed: int,
        requests: int = 6000,
        rate_per_min: float = 20.0,
        pool: int = 2000,
        pool_every: int = 3000,
        chat_share: float = 0.2,
        start_s: float = 0.0,
        model: str = "teacher",
    ) -> None:
        super().__init__(name, (name,), seed, model)
        self.requests = requests
        self.rate_per_min = rate_per_min
        self.pool = pool
        self.pool_every = pool_every
        self.chat_share = chat_share
        self.start_s = start_s
        self.params = {"temperature": 0.7, "max_tokens": 32}

    def queries(self) -> QueryStream:
        rng = self.rng("traffic")
        weights = [1.0 / (rank + 1) for rank in range(self.pool)]
        rate = self.rate_per_min / 60.0
        end = self.start_s + 3 * self.requests / rate  # ample: stops after `requests`
        times = iter(poisson_arrivals(rng, rate, self.start_s, end))
        sent, pool = 0, []
        while sent < self.requests:
            if sent % self.pool_every == 0 or not pool:
                pool = [task.sample_problem(rng, "heldout") for _ in range(self.pool)]
            first = rng.choices(pool, weights)[0]
            messages = [{"role": "user", "content": first.question}]
            yield Query(self.name, next(times), "chat", self._body(messages), first)
            sent += 1
            if sent < self.requests and rng.random() < self.chat_share:
                second = rng.choices(pool, weights)[0]
                messages += [
                    {"role": "assistant", "content": task.render_answer(first, rng)},
                    {"role": "user", "content": second.question},
                ]
                yield Query(self.name, next(times), "chat", self._body(messages), second)
                sent += 1

    def _body(self, messages: list[dict[str, str]]) -> dict:
        return chat_body(self.model, messages, self.params)
