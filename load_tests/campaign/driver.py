"""The driver: every simulator's queries sent to the guard on the compressed timeline."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from guard_server.teacher import task
from load_tests.campaign.config import api_key
from load_tests.simulators import Query, Reply, Simulator, reply_texts


@dataclass(slots=True)
class Attempt:
    """One HTTP request for a query (a query is retried after a 429)."""

    sent_s: float  # real seconds since the start
    status: int
    risk: float | None = None
    action: str = "pass"  # what the guard decided (audit log); for 429s, from the risk


@dataclass(slots=True)
class Outcome:
    """What happened to one query."""

    actor: str
    kind: str
    role: str
    query: Query
    body_hash: str
    attempts: list[Attempt] = field(default_factory=list)
    status: int = 0  # of the last attempt; 0 = never sent (deadline or suspended key)
    text: str | None = None  # the first choice's
    texts: list[str] = field(default_factory=list)  # every choice's, in index order
    error: str | None = None
    planned_real_s: float = 0.0  # when the driver meant to send it (after back-off shifts)
    finished_s: float = 0.0
    latency_s: float = 0.0

    @property
    def final(self) -> Attempt | None:
        """The last attempt."""
        return self.attempts[-1] if self.attempts else None

    def pairs(self) -> list[tuple[task.Problem, str]]:
        """(problem, answer text) of every answer (one per choice of a batched reply)."""
        texts = self.texts or ([self.text] if self.text is not None else [])
        return [(self.query.problem_of(c), text) for c, text in enumerate(texts)]


class Driver:
    """Sends every simulator's queries to the guard on the compressed timeline.

    A query planned at simulated second ``t`` is sent at real second ``t / compression``
    (plus the client's accumulated back-off). Queries without ``await_reply`` are sent
    without waiting for earlier answers (open loop), so the guard sees the planned gaps.
    On a 429 the client waits ``Retry-After`` (real seconds, as the SDK does) and retries
    (honest users twice, like the SDK's default; attackers up to ten times), and its later
    queries shift by the time lost. After a 403 a key sends nothing more.
    """

    def __init__(
        self,
        base_url: str,
        compression: float,
        deadline_real_s: float,
        max_in_flight: int = 256,
        request_timeout_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.compression = compression
        self.deadline = deadline_real_s
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self.outcomes: list[Outcome] = []
        self._shift: dict[str, float] = defaultdict(float)
        self._paused_until: dict[str, float] = defaultdict(float)
        self._suspended: set[str] = set()
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._t0 = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _planned(self, query: Query) -> float:
        return query.at_s / self.compression + self._shift[query.client]

    async def run(self, sims: list[Simulator]) -> list[Outcome]:
        """Drive all simulators concurrently until they finish or the deadline passes."""
        self._sem = asyncio.Semaphore(self.max_in_flight)
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            self._t0 = time.monotonic()
            await asyncio.gather(*(self._actor(sim) for sim in sims))
            while self._tasks:
                await asyncio.gather(*list(self._tasks))
        return self.outcomes

    async def _actor(self, sim: Simulator) -> None:
        stream = sim.queries()
        try:
            query = next(stream)
            while True:
                planned = self._planned(query)
                if planned > self.deadline or query.client in self._suspended:
                    self._record_unsent(sim, query)
                    query = stream.send(None)
                    continue
                start = max(planned, self._paused_until[query.client])
                await asyncio.sleep(max(0.0, start - self._now()))
                if query.await_reply:
                    outcome = await self._send(sim, query)
                    sim_now = (self._now() - self._shift[query.client]) * self.compression
                    query = stream.send(Reply(outcome.status, outcome.text, sim_now))
                else:
                    task_ = asyncio.get_running_loop().create_task(self._send(sim, query))
                    self._tasks.add(task_)
                    task_.add_done_callback(self._tasks.discard)
                    query = stream.send(None)
        except StopIteration:
            return

    def _record_unsent(self, sim: Simulator, query: Query) -> None:
        outcome = Outcome(sim.name, sim.kind, sim.role, query, _body_hash(query.body))
        self.outcomes.append(outcome)

    async def _send(self, sim: Simulator, query: Query) -> Outcome:
        assert self._session is not None and self._sem is not None
        data = orjson.dumps(query.body)
        outcome = Outcome(sim.name, sim.kind, sim.role, query, _body_hash(query.body))
        outcome.planned_real_s = self._planned(query)
        self.outcomes.append(outcome)
        headers = {
            "Authorization": f"Bearer {api_key(query.client)}",
            "Content-Type": "application/json",
        }
        retries = 2 if sim.role == "honest" else 10
        client = query.client
        while True:
            wait = self._paused_until[client] - self._now()
            if wait > 0:
                await asyncio.sleep(wait)
            if client in self._suspended or self._now() > self.deadline:
                break
            sent = self._now()
            if self._paused_until[client] > 0:
                # Sent late after a back-off: the client's later queries shift as much.
                lateness = sent - query.at_s / self.compression
                self._shift[client] = max(self._shift[client], lateness)
            status, payload, retry_after = await self._post(query.path, data, headers)
            outcome.attempts.append(Attempt(sent, status))
            outcome.status = status
            outcome.latency_s = self._now() - sent
            if status == 200 and payload is not None:
                outcome.texts = reply_texts(query.endpoint, payload)
                outcome.text = outcome.texts[0] if outcome.texts else ""
                break
            if payload is not None:
                outcome.error = str(payload.get("error", {}).get("message", ""))[:200]
            if status == 403:
                self._suspended.add(client)
            elif status == 429 and retries > 0:
                retries -= 1
                self._paused_until[client] = max(
                    self._paused_until[client], self._now() + retry_after
                )
                continue
            break
        outcome.finished_s = self._now()
        return outcome

    async def _post(
        self, path: str, data: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any] | None, float]:
        assert self._session is not None and self._sem is not None
        try:
            async with (
                self._sem,
                self._session.post(self.base_url + path, data=data, headers=headers) as response,
            ):
                body = await response.read()
                retry_after = float(response.headers.get("Retry-After", "1"))
                try:
                    payload = orjson.loads(body) if body else None
                except orjson.JSONDecodeError:
                    payload = None
                return response.status, payload, retry_after
        except (TimeoutError, aiohttp.ClientError):
            return 599, None, 1.0


def _body_hash(body: dict[str, Any]) -> str:
    """The guard's audit ``request_hash`` of the exact bytes the driver sends."""
    return hashlib.blake2b(orjson.dumps(body), digest_size=16).hexdigest()
