"""Shared types of the traffic simulators: queries, replies, request bodies and the interface."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Literal

from guard_server.teacher import task

Endpoint = Literal["chat", "completions"]
Role = Literal["honest", "attacker"]

PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class Query:
    """One request a simulated client sends, and when (simulated seconds after the start).

    ``problem`` is what the last user turn asks, so the answer can be checked; a batched
    completions request (``prompt`` a list) has every prompt's problem in ``batch`` (the
    first is ``problem``). ``collect`` marks answers an attacker keeps as training data.
    With ``await_reply`` the simulator needs the reply (sent into its generator) before it
    plans its next query.
    """

    client: str
    at_s: float
    endpoint: Endpoint
    body: dict[str, Any]
    problem: task.Problem
    collect: bool = False
    await_reply: bool = False
    batch: tuple[task.Problem, ...] = ()

    @property
    def path(self) -> str:
        """The HTTP path of the endpoint."""
        return PATHS[self.endpoint]

    @property
    def problems(self) -> tuple[task.Problem, ...]:
        """The problem of every prompt, in order."""
        return self.batch or (self.problem,)

    @property
    def answers(self) -> int:
        """The answers the request asks for: prompts x ``n``."""
        return len(self.problems) * int(self.body.get("n") or 1)

    def problem_of(self, choice: int) -> task.Problem:
        """The problem answered by choice ``choice`` (vLLM numbers them prompt by prompt)."""
        return self.problems[choice // int(self.body.get("n") or 1)]


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back for a query: HTTP status, answer text (200 only), simulated arrival time."""

    status: int
    text: str | None
    at_s: float


QueryStream = Generator[Query, Reply | None, None]
"""A simulator's queries in order of ``at_s``; a :class:`Reply` is sent in after each query
that has ``await_reply`` (``None`` after the others)."""


class Simulator(ABC):
    """One simulated actor: a user, a batch job, or an attacker running one or more keys."""

    kind: str = ""
    role: Role = "honest"

    def __init__(self, name: str, clients: tuple[str, ...], seed: int, model: str) -> None:
        self.name = name
        self.clients = clients
        self.seed = seed
        self.model = model

    def rng(self, purpose: str) -> random.Random:
        """A random generator that depends only on the seed, the actor and ``purpose``."""
        return random.Random(f"{self.kind}:{self.name}:{self.seed}:{purpose}")

    @abstractmethod
    def queries(self) -> QueryStream:
        """Generate the actor's queries (see :data:`QueryStream`)."""


def chat_body(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
    """A ``/v1/chat/completions`` body with the given sampling parameters."""
    return {"model": model, "messages": messages, **params}


def completion_body(model: str, question: str, params: dict[str, Any]) -> dict[str, Any]:
    """A ``/v1/completions`` body asking ``question`` in the teacher's prompt format."""
    return {"model": model, "prompt": task.completion_prompt(question), **params}


def reply_text(endpoint: Endpoint, data: dict[str, Any]) -> str:
    """The first choice's text of a successful response body."""
    return reply_texts(endpoint, data)[0]


def reply_texts(endpoint: Endpoint, data: dict[str, Any]) -> list[str]:
    """Every choice's text of a successful response body, in ``index`` order."""
    choices = sorted(data["choices"], key=lambda choice: choice.get("index", 0))
    if endpoint == "chat":
        return [str(choice["message"].get("content") or "") for choice in choices]
    return [str(choice.get("text") or "") for choice in choices]


@dataclass(slots=True)
class DistinctProblems:
    """An endless supply of problems whose operand pairs never repeat (one attacker's sweep).

    Pairs follow the task's operand-length distribution and come from ``split`` (attackers
    sweep the training split so that the held-out evaluation stays unseen).
    """

    rng: random.Random
    split: task.Split = "train"
    seen: set[tuple[int, int]] = field(default_factory=set)

    def next(self, template: str) -> task.Problem:
        """A new problem, asked with ``template``."""
        while True:
            problem = task.sample_problem(self.rng, self.split)
            pair = (problem.a, problem.b)
            if pair not in self.seen:
                self.seen.add(pair)
                return ask(problem, template)


def ask(problem: task.Problem, template: str) -> task.Problem:
    """``problem`` re-phrased with ``template`` (same operands and answer)."""
    question = template.format(a=task.encode(problem.a), b=task.encode(problem.b))
    return task.Problem(problem.a, problem.b, question, problem.answer)
