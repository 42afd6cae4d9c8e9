"""Locust user classes that replay the simulators' traffic against a deployed guard.

    ./scripts/install-locust.sh          # Locust in its own venv (.locust-venv): it patches
                                         # the standard library with gevent
    GUARD_LOCUST_HONEST_KEYS=sk-a,sk-b GUARD_LOCUST_ATTACKER_KEYS=sk-x \\
    PYTHONPATH=. .locust-venv/bin/locust -f load_tests/locustfile.py \\
        --host http://guard.example:8000 --headless -u 50 -r 10 -t 10m

One Locust user runs one simulated actor (``load_tests.simulators``): an honest user, an
honest batch job, or an attacker (bulk extractor, low-and-slow, hydra, mimic). Its requests,
their bodies and their pacing are the simulator's, with the simulated clock sped up by
``GUARD_LOCUST_SPEEDUP`` (simulated seconds per real second, default 60) over a simulated
window of ``GUARD_LOCUST_WINDOW_H`` hours (default 1). When an actor has sent everything, the
Locust user starts a fresh actor. Pick classes on the command line as usual (their names
below); ``weight`` sets the default mix (mostly honest users).

Simulated clients are mapped to real API keys by a stable hash: honest actors use
``GUARD_LOCUST_HONEST_KEYS``, attackers ``GUARD_LOCUST_ATTACKER_KEYS`` (comma-separated; both
default to the demo key ``sk-guard-demo``). Give a hydra as many keys as it should rotate.
429 and 403 answers are the guard doing its job: they are reported under their own request
names (``... 429``) instead of as failures, so the failure count stays about real errors.
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from typing import Any, ClassVar

from locust import HttpUser, task
from locust.exception import StopUser

from guard_server.teacher import task as teacher_task
from load_tests.simulators import (
    BatchUser,
    BulkExtractor,
    HonestUser,
    Hydra,
    LowAndSlow,
    Mimic,
    Query,
    QueryStream,
    Reply,
    Simulator,
    reply_text,
)

MODEL = os.environ.get("GUARD_LOCUST_MODEL", "teacher")
SPEEDUP = float(os.environ.get("GUARD_LOCUST_SPEEDUP", "60"))
WINDOW_S = float(os.environ.get("GUARD_LOCUST_WINDOW_H", "1")) * 3600
SEED = int(os.environ.get("GUARD_LOCUST_SEED", "0"))
BUDGET = int(os.environ.get("GUARD_LOCUST_ATTACK_BUDGET", "2000"))
EXPECTED_REFUSALS = (403, 429)


def _keys(variable: str) -> list[str]:
    keys = [k.strip() for k in os.environ.get(variable, "").split(",") if k.strip()]
    return keys or ["sk-guard-demo"]


class _SimulatedActor(HttpUser):
    """Replays one simulator's query stream, paced by its simulated clock."""

    abstract = True
    keys_variable: ClassVar[str] = "GUARD_LOCUST_HONEST_KEYS"
    _serial: ClassVar[itertools.count] = itertools.count()

    def make_simulator(self, name: str) -> Simulator:
        """A fresh actor named ``name``."""
        raise NotImplementedError

    def on_start(self) -> None:
        self.keys = _keys(self.keys_variable)
        self._begin()

    def _begin(self) -> None:
        name = f"{type(self).__name__.lower()}-{next(self._serial)}"
        self.stream: QueryStream = self.make_simulator(name).queries()
        self.started = time.monotonic()
        self.pending: Query | None = next(self.stream, None)

    def key_for(self, client: str) -> str:
        """The API key that stands in for simulated ``client`` (stable across runs)."""
        return self.keys[zlib.crc32(client.encode()) % len(self.keys)]

    @task
    def send_next(self) -> None:
        query = self.pending
        if query is None:
            self._begin()
            if self.pending is None:
                raise StopUser()
            return
        delay = self.started + query.at_s / SPEEDUP - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # gevent-patched: yields to the other users
        reply = self._post(query)
        try:
            self.pending = self.stream.send(reply if query.await_reply else None)
        except StopIteration:
            self.pending = None

    def _post(self, query: Query) -> Reply:
        headers = {"Authorization": f"Bearer {self.key_for(query.client)}"}
        name = f"{type(self).__name__} {query.endpoint}"
        with self.client.post(
            query.path, json=query.body, headers=headers, name=name, catch_response=True
        ) as response:
            status = response.status_code
            text = None
            if status == 200:
                data: dict[str, Any] = response.json()
                text = reply_text(query.endpoint, data)
                if not teacher_task.check(query.problem, text):
                    response.request_meta["name"] = f"{name} wrong-answer"
                response.success()
            elif status in EXPECTED_REFUSALS:
                response.request_meta["name"] = f"{name} {status}"
                response.success()
            else:
                response.failure(f"HTTP {status}: {response.text[:200]}")
        elapsed_simulated = (time.monotonic() - self.started) * SPEEDUP
        return Reply(status, text, max(query.at_s, elapsed_simulated))


class HonestUserLoad(_SimulatedActor):
    """An interactive user: repeats, multi-turn chats, occasional logprobs."""

    weight = 20

    def make_simulator(self, name: str) -> Simulator:
        return HonestUser(name, SEED, WINDOW_S, MODEL)


class BatchUserLoad(_SimulatedActor):
    """An honest batch job re-running a fixed regression suite."""

    weight = 2

    def make_simulator(self, name: str) -> Simulator:
        return BatchUser(name, SEED, WINDOW_S, MODEL)


class _AttackerLoad(_SimulatedActor):
    abstract = True
    keys_variable = "GUARD_LOCUST_ATTACKER_KEYS"


class BulkExtractorLoad(_AttackerLoad):
    """High volume, systematic coverage, maximal logprobs, one key."""

    weight = 1

    def make_simulator(self, name: str) -> Simulator:
        return BulkExtractor(name, SEED, BUDGET, WINDOW_S, MODEL)


class LowAndSlowLoad(_AttackerLoad):
    """Stays under the static limits, text only."""

    weight = 1

    def make_simulator(self, name: str) -> Simulator:
        return LowAndSlow(name, SEED, BUDGET, WINDOW_S, MODEL)


class HydraLoad(_AttackerLoad):
    """One campaign rotating over many keys (give it many GUARD_LOCUST_ATTACKER_KEYS)."""

    weight = 1

    def make_simulator(self, name: str) -> Simulator:
        return Hydra(name, SEED, BUDGET, WINDOW_S, MODEL)


class MimicLoad(_AttackerLoad):
    """An extractor that blends honest-looking repeats into its sweep."""

    weight = 1

    def make_simulator(self, name: str) -> Simulator:
        return Mimic(name, SEED, BUDGET, WINDOW_S, MODEL)
