"""Extraction campaigns: simulated honest users and attackers against the guard, defended or not."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import json
import os
import secrets
import socket
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from guard_server.config.schema import TierPolicy
from guard_server.detection.scoring import ACTIONS
from guard_server.pipeline.auth import hash_key
from guard_server.teacher import task
from guard_server.upstream.bundled_teacher import TEACHER_DIR
from load_tests.attacks.common import GuardServer
from load_tests.simulators import Query, Reply, Simulator, attackers, honest_population, reply_text
from load_tests.simulators.attackers import LowAndSlow

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = REPO / "policies" / "default.yaml"
ADMIN_KEY = "sk-campaign-admin"
PORTS = range(8600, 8700)
NOMINAL_LIMITS = {"requests_per_minute": 60, "tokens_per_minute": 20_000}
"""The static per-client limits of the campaign tier, in simulated time (scaled by the
compression factor in the generated policy, since the guard's clock is real time)."""

PHASES = ("defended", "undefended")
"""``defended``: the default tier's policy (detection on); ``undefended``: the same tier with
detection disabled. Both have the same static limits."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class CampaignConfig:
    """The simulated populations, the timeline and the student's training budget."""

    budget: int = 4000  # queries per attacker (the hydra's over all its keys)
    honest: int = 200
    batch: int = 3
    hydra_keys: int = 60
    window_h: float = 4.0  # simulated duration of the campaign
    compression: float = 15.0  # simulated seconds per real second
    grace: float = 0.5  # extra share of the window a throttled sender may take
    seed: int = 0
    honest_requests: float = 25.0  # mean requests per interactive user over the window
    suite_size: int = 400  # mean size of a batch user's regression suite
    suite_runs: int = 3
    student_steps: int | None = None  # None: the lab's StudentConfig
    student_batch: int | None = None
    eval_n: int = 500
    kinds: tuple[str, ...] = ("bulk", "low_and_slow", "hydra", "mimic")
    thresholds: tuple[float, ...] | None = None  # tighten, perturb, decoy, block (policy override)

    @property
    def window_s(self) -> float:
        """The simulated window in seconds."""
        return self.window_h * 3600.0

    @property
    def deadline_real_s(self) -> float:
        """Real seconds after which no new request is sent."""
        return self.window_s * (1.0 + self.grace) / self.compression


QUICK = CampaignConfig(
    budget=2000,
    honest=50,
    batch=1,
    hydra_keys=50,
    window_h=1.0,
    compression=15.0,
    honest_requests=12.0,
    suite_size=200,
    suite_runs=2,
    eval_n=300,
)


def population(cfg: CampaignConfig, model: str = "teacher") -> list[Simulator]:
    """The honest users, batch jobs and attackers of a campaign."""
    sims: list[Simulator] = honest_population(
        cfg.honest,
        cfg.batch,
        cfg.seed,
        cfg.window_s,
        model,
        mean_requests=cfg.honest_requests,
        suite_size=cfg.suite_size,
        suite_runs=cfg.suite_runs,
    )
    for attacker in attackers(cfg.seed, cfg.budget, cfg.window_s, model, cfg.hydra_keys):
        if attacker.kind not in cfg.kinds:
            continue
        if attacker.rate_per_min() >= NOMINAL_LIMITS["requests_per_minute"]:
            raise ValueError(f"{attacker.name} would exceed the static limit; lower --budget")
        sims.append(attacker)
    return sims


def api_key(client: str) -> str:
    """The (test-only, deterministic) API key of a simulated client."""
    return f"sk-campaign-{client}"


def campaign_tier(
    detection: bool, compression: float, thresholds: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """The default tier of ``policies/default.yaml`` with the campaign's static limits.

    ``thresholds`` (tighten, perturb, decoy, block) override the tier's action thresholds.
    """
    tier = dict(yaml.safe_load(DEFAULT_POLICY.read_text())["tiers"]["default"])
    tier["limits"] = {name: round(v * compression) for name, v in NOMINAL_LIMITS.items()}
    settings = dict(tier.get("detection", {}))
    if thresholds is not None:
        settings["thresholds"] = dict(zip(ACTIONS[1:], thresholds, strict=True))
    if not detection:
        settings["enabled"] = False
    tier["detection"] = settings
    return tier


def write_guard_config(
    directory: Path, vllm_url: str, clients: list[str], phase: str, cfg: CampaignConfig
) -> Path:
    """A guard config + policy for one phase: all clients on one tier, admin API and audit on."""
    directory = directory.resolve()  # the guard resolves relative paths from the config's folder
    directory.mkdir(parents=True, exist_ok=True)
    policy = {
        "tiers": {phase: campaign_tier(phase == "defended", cfg.compression, cfg.thresholds)},
        "clients": {c: {"tier": phase, "keys": [hash_key(api_key(c))]} for c in clients},
    }
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    secret = directory / "secret"
    secret.write_text(secrets.token_hex(32))
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "reload_interval_s": 5},
        "upstreams": {
            "teacher": {
                "urls": [vllm_url],
                "timeouts": {"connect": 5, "read": 60, "total": 120},
                "max_connections": 512,
            }
        },
        "secret": {"file": str(secret)},
        "admin": {"key_hash": hash_key(ADMIN_KEY)},
        "audit": {"path": str(directory / "audit.jsonl"), "max_bytes": 2_000_000_000},
        "policies": [str(directory / "policy.yaml")],
    }
    path = directory / "guard.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- processes


def free_port_in(ports: range = PORTS) -> int:
    """A free port on 127.0.0.1 from ``ports``."""
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


# --------------------------------------------------------------------------- the driver


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
    text: str | None = None
    error: str | None = None
    planned_real_s: float = 0.0  # when the driver meant to send it (after back-off shifts)
    finished_s: float = 0.0
    latency_s: float = 0.0

    @property
    def final(self) -> Attempt | None:
        """The last attempt."""
        return self.attempts[-1] if self.attempts else None


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
                outcome.text = reply_text(query.endpoint, payload)
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


# --------------------------------------------------------------------------- analysis


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
            if attempt.status != 200:
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


def summarize_attacker(
    sim: Simulator, outcomes: list[Outcome], admin: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Detection, poisoning and collection numbers for one attacker."""
    attempts = sorted((a for o in outcomes for a in o.attempts), key=lambda a: a.sent_s)
    answered = [o for o in outcomes if o.status == 200]
    collected = [o for o in answered if o.query.collect]
    actions = [o.final.action for o in collected if o.final]
    n = max(1, len(collected))
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
        "first_perturbed": _first_index(attempts, lambda a: a.action in ("perturb", "decoy")),
        "first_decoyed": _first_index(attempts, lambda a: a.action == "decoy"),
        "collected": len(collected),
        "distinct_collected": len({(o.query.problem.a, o.query.problem.b) for o in collected}),
        "decoyed_share": sum(a == "decoy" for a in actions) / n,
        "perturbed_share": sum(a == "perturb" for a in actions) / n,
        "wrong_share": sum(not task.check(o.query.problem, o.text or "") for o in collected) / n,
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


# --------------------------------------------------------------------------- offline replay


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
            outcome.text = f" The answer is {query.problem.answer}."
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


# --------------------------------------------------------------------------- one phase


@dataclass(slots=True)
class PhaseResult:
    """Everything one phase produced."""

    phase: str
    summary: dict[str, Any]
    pairs: dict[str, list[tuple[str, str]]]  # attacker -> (completion prompt, answer) pairs


def run_phase(
    phase: str, cfg: CampaignConfig, vllm_url: str, out: Path, sims: list[Simulator]
) -> PhaseResult:
    """Start a guard for ``phase``, drive the campaign through it, and summarize."""
    directory = out / phase
    clients = [c for sim in sims for c in sim.clients]
    config = write_guard_config(directory, vllm_url, clients, phase, cfg)
    (directory / "audit.jsonl").unlink(missing_ok=True)
    guard = GuardServer(config, free_port_in(), directory / "guard.log").start()
    thresholds = campaign_thresholds(cfg.thresholds)
    try:
        print(f"[{phase}] guard on {guard.url}; driving {len(sims)} actors", flush=True)
        started = time.monotonic()
        driver = Driver(guard.url, cfg.compression, cfg.deadline_real_s)
        outcomes = asyncio.run(asyncio.wait_for(driver.run(sims), cfg.deadline_real_s + 180.0))
        real_s = time.monotonic() - started
        admin = asyncio.run(admin_reports(guard.url, clients))
    finally:
        guard.stop()
    unmatched = attach_audit(outcomes, directory / "audit.jsonl", thresholds)
    by_actor: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_actor[outcome.actor].append(outcome)
    honest = [s for s in sims if s.role == "honest"]
    summary = {
        "phase": phase,
        "thresholds": thresholds if phase == "defended" else None,
        "timing": timing_summary(outcomes, real_s),
        "audit_unmatched": unmatched,
        "honest": summarize_honest(honest, [o for s in honest for o in by_actor[s.name]], admin),
        "attackers": {
            s.name: summarize_attacker(s, by_actor[s.name], admin)
            for s in sims
            if s.role == "attacker"
        },
    }
    pairs = {
        s.name: [
            (task.completion_prompt(o.query.problem.question), " " + (o.text or "").strip())
            for o in by_actor[s.name]
            if o.status == 200 and o.query.collect
        ]
        for s in sims
        if s.role == "attacker"
    }
    print(f"[{phase}] done in {real_s:.0f} s: {summary['timing']}", flush=True)
    return PhaseResult(phase, summary, pairs)


def defended_tier(override: tuple[float, ...] | None = None) -> TierPolicy:
    """The defended phase's tier, validated (with the thresholds ``override`` if given)."""
    return TierPolicy.model_validate(campaign_tier(True, 1.0, override))


def campaign_thresholds(override: tuple[float, ...] | None = None) -> dict[str, float]:
    """The campaign tier's action thresholds (the default tier's, or ``override``)."""
    return defended_tier(override).detection.thresholds.model_dump()


# --------------------------------------------------------------------------- students


def save_phase(result: PhaseResult, meta: dict[str, Any], out: Path) -> None:
    """Write the phase's summary (``<phase>.json``) and collected pairs (``<phase>/pairs-*``)."""
    (out / result.phase).mkdir(parents=True, exist_ok=True)
    for actor, pairs in result.pairs.items():
        lines = (json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs)
        (out / result.phase / f"pairs-{actor}.jsonl").write_text("".join(lines))
    payload = {"meta": meta, **result.summary}
    (out / f"{result.phase}.json").write_text(json.dumps(payload, indent=2) + "\n")


def load_phase(phase: str, out: Path) -> PhaseResult:
    """A phase saved by :func:`save_phase`."""
    summary = json.loads((out / f"{phase}.json").read_text())
    summary.pop("meta")
    pairs = {}
    for actor in summary["attackers"]:
        path = out / phase / f"pairs-{actor}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        pairs[actor] = [(row["prompt"], row["answer"]) for row in rows]
    return PhaseResult(phase, summary, pairs)


def train_students(
    results: list[PhaseResult],
    cfg: CampaignConfig,
    tokenizer_dir: Path,
    cache: Path,
    actors: tuple[str, ...] | None = None,
) -> None:
    """Train one student per phase and attacker on what it collected; store the accuracy.

    The student is ``load_tests.lab.student`` (the teacher's tokenizer, a fresh small
    Llama, a fixed number of optimiser steps), evaluated by greedy exact match on held-out
    problems that no attacker asked. Pairs are sorted first, so the result depends only on
    the collected set; results are kept in ``cache`` by a hash of that set and the student
    settings, so identical data (e.g. a phase in which nothing was decoyed) trains once.
    ``actors`` limits training to those attackers.
    """
    import torch

    from load_tests.lab import student

    torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))  # taskset-aware
    tokenizer = student.load_tokenizer(tokenizer_dir)
    heldout = task.make_problems(cfg.eval_n, seed=1, split="heldout")
    student_cfg = student.StudentConfig()
    student_cfg = replace(
        student_cfg,
        steps=cfg.student_steps or student_cfg.steps,
        batch=cfg.student_batch or student_cfg.batch,
    )
    known: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    for result in results:
        for actor, pairs in result.pairs.items():
            if actors is not None and actor not in actors:
                continue
            data = sorted(pairs)
            key = hashlib.sha256(
                orjson.dumps([data, asdict(student_cfg), cfg.seed, cfg.eval_n, str(tokenizer_dir)])
            ).hexdigest()
            if key not in known:
                acc, seconds = 0.0, 0.0
                if data:
                    acc, seconds = student.timed_run(
                        data, heldout, tokenizer, student_cfg, cfg.seed
                    )
                known[key] = {"accuracy": acc, "seconds": round(seconds, 1)}
                # Merge with what is on disk: runs for other actors may share the cache.
                on_disk = json.loads(cache.read_text()) if cache.exists() else {}
                cache.write_text(json.dumps({**on_disk, **known}, indent=1))
            entry = result.summary["attackers"][actor]
            entry["student_accuracy"] = known[key]["accuracy"]
            entry["student_seconds"] = known[key]["seconds"]
            entry["student"] = {"steps": student_cfg.steps, "batch": student_cfg.batch}
            print(
                f"[{result.phase}] student of {actor} ({len(data)} pairs): "
                f"{entry['student_accuracy']:.3f}",
                flush=True,
            )


# --------------------------------------------------------------------------- report


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: int | None) -> str:
    return "never" if value is None else f"{value:,}"


def targets(summaries: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """Each target, what was reached, and whether it is met (``None``: not measured)."""
    rows: list[tuple[str, str, bool | None]] = []
    defended = summaries.get("defended")
    undefended = summaries.get("undefended")
    if defended is None:
        return rows
    honest = defended["honest"]
    rows.append((
        "≤ 0.5% of honest clients flagged (flagged, throttled or decoyed)",
        f"{len(honest['false_positive_clients'])}/{honest['clients']} "
        f"= {_pct(honest['false_positive_rate'], 2)}",
        honest["false_positive_rate"] <= 0.005,
    ))  # fmt: skip
    rows.append((
        "zero honest requests decoyed",
        f"{honest['decoyed_requests']} of {honest['requests']}",
        honest["decoyed_requests"] == 0,
    ))  # fmt: skip
    for name in ("bulk", "hydra"):
        attacker = defended["attackers"].get(name)
        if attacker is None:
            continue
        first = attacker["first_flagged"]
        rows.append((
            f"{name} flagged within 2,000 of its queries",
            f"at query {_num(first)}",
            first is not None and first <= 2000,
        ))  # fmt: skip
    if undefended is None:
        return rows
    for name, attacker in defended["attackers"].items():
        base = undefended["attackers"].get(name, {}).get("student_accuracy")
        acc = attacker.get("student_accuracy")
        if base is None or acc is None:
            rows.append((f"{name}: student accuracy ≥ 50% lower than undefended", "—", None))
            continue
        drop = (base - acc) / base if base > 0 else 0.0
        rows.append((
            f"{name}: student accuracy ≥ 50% lower (relative) than undefended",
            f"{_pct(acc)} vs {_pct(base)} (−{_pct(drop, 0)})",
            base > 0 and drop >= 0.5,
        ))  # fmt: skip
    delta = defended["honest"]["accuracy"] - undefended["honest"]["accuracy"]
    rows.append((
        "honest answer accuracy within 0.5 point of undefended",
        f"{_pct(defended['honest']['accuracy'], 2)} vs "
        f"{_pct(undefended['honest']['accuracy'], 2)} ({100 * delta:+.2f} points)",
        abs(delta) <= 0.005,
    ))  # fmt: skip
    return rows


def markdown(meta: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> str:
    """The report: attackers, honest users, timeline fidelity, targets."""
    cfg = meta["config"]
    lines = [
        f"Campaign: {cfg['honest']} interactive users + {cfg['batch']} batch jobs, attackers "
        f"with a budget of {cfg['budget']:,} queries each (hydra: {cfg['hydra_keys']} keys), "
        f"{cfg['window_h']:g} simulated hours compressed {cfg['compression']:g}× "
        f"(seed {cfg['seed']}, teacher `{meta['teacher']}`).",
    ]
    defended = summaries.get("defended")
    if defended and defended.get("thresholds"):
        t = defended["thresholds"]
        lines.append(
            f"Defended tier thresholds: tighten {t['tighten']:g}, perturb {t['perturb']:g}, "
            f"decoy {t['decoy']:g}, block {t['block']:g}."
        )
    students = {
        json.dumps(a["student"]) for s in summaries.values() for a in s["attackers"].values()
        if "student" in a
    }  # fmt: skip
    for spec in sorted(students):
        student = json.loads(spec)
        lines.append(
            f"Students: `load_tests.lab.student`, {student['steps']} steps × batch "
            f"{student['batch']}, greedy exact match on {cfg['eval_n']} held-out problems."
        )
    lines += [
        "",
        "| attacker | phase | answered | first flagged at | first perturb+ at | first decoy at "
        "| collected decoyed | collected perturbed | wrong answers | keys flagged (end) "
        "| student accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = sorted({n for s in summaries.values() for n in s["attackers"]})
    for name in names:
        for phase, summary in summaries.items():
            a = summary["attackers"].get(name)
            if a is None:
                continue
            lines.append(
                f"| {name} | {phase} | {a['answered']:,} | {_num(a['first_flagged'])} "
                f"| {_num(a['first_perturbed'])} | {_num(a['first_decoyed'])} "
                f"| {_pct(a['decoyed_share'])} | {_pct(a['perturbed_share'])} "
                f"| {_pct(a['wrong_share'])} | {a['keys_flagged_final']}/{a['keys']} "
                f"| {_pct(a.get('student_accuracy'))} |"
            )
    lines += [
        "",
        "| honest users | clients | flagged | throttled (429) | decoyed clients "
        "| false-positive rate | requests | decoyed requests | answer accuracy "
        "| single-turn accuracy | max risk seen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, summary in summaries.items():
        h = summary["honest"]
        lines.append(
            f"| {phase} | {h['clients']} | {h['flagged']} | {h['throttled']} "
            f"| {h['decoyed_clients']} | {_pct(h['false_positive_rate'], 2)} | {h['requests']:,} "
            f"| {h['decoyed_requests']} | {_pct(h['accuracy'], 2)} "
            f"| {_pct(h.get('accuracy_single_turn'), 2)} | {h['max_risk']:.3f} |"
        )
    lines += [
        "",
        "| phase | real seconds | requests | requests/s | latency p50 / p99 "
        "| open-loop lateness p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase, summary in summaries.items():
        t = summary["timing"]
        lines.append(
            f"| {phase} | {t['real_seconds']:,} | {t['requests']:,} | {t['requests_per_real_s']} "
            f"| {1000 * t['latency_p50_s']:.0f} / {1000 * t['latency_p99_s']:.0f} ms "
            f"| {1000 * t['open_loop_lateness_p50_s']:.0f} / "
            f"{1000 * t['open_loop_lateness_p99_s']:.0f} ms |"
        )
    rows = targets(summaries)
    if rows:
        lines += ["", "| target | reached | met |", "|---|---|---|"]
        for name, reached, met in rows:
            verdict = "—" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {name} | {reached} | {verdict} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command


def start_vllm(teacher: Path, out: Path) -> Any:
    """Real vLLM on the teacher, on a port of the campaign's range."""
    from guard_server.upstream.vllm_process import VllmProcess

    process = VllmProcess(teacher, "teacher", port=free_port_in(), log_path=out / "vllm.log")
    process.start()
    try:
        seconds = process.wait_healthy(600)
    except BaseException:
        process.stop()
        raise
    print(f"vLLM on {process.url} healthy after {seconds:.0f} s", flush=True)
    return process


def main(argv: list[str] | None = None) -> None:
    """Run the campaign's phases, train the students, write the report."""
    ap = argparse.ArgumentParser(
        description="Simulated honest users and extraction attackers against the guard: "
        "detection, false positives and the attackers' student accuracy, defended and "
        "undefended."
    )
    ap.add_argument("--quick", action="store_true", help="a small population and budget")
    phase_group = ap.add_mutually_exclusive_group()
    phase_group.add_argument("--undefended", action="store_true", help="only the undefended run")
    phase_group.add_argument("--defended", action="store_true", help="only the defended run")
    ap.add_argument("--budget", type=int, help="queries per attacker")
    ap.add_argument("--honest", type=int, help="interactive honest users")
    ap.add_argument("--batch", type=int, help="honest batch users")
    ap.add_argument("--hydra-keys", type=int)
    ap.add_argument("--window-h", type=float, help="simulated hours")
    ap.add_argument("--compression", type=float, help="simulated seconds per real second")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--student-steps", type=int)
    ap.add_argument("--eval-n", type=int)
    ap.add_argument("--student-batch", type=int)
    ap.add_argument(
        "--student-actors",
        type=lambda text: tuple(text.split(",")),
        help="train students only for these attackers (comma-separated)",
    )
    ap.add_argument(
        "--thresholds",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        help="tighten,perturb,decoy,block for the defended tier (default: the policy's)",
    )
    ap.add_argument("--no-students", action="store_true", help="skip student training")
    ap.add_argument(
        "--students-only",
        action="store_true",
        help="train students on the pairs a previous run saved in --out",
    )
    ap.add_argument("--vllm-url", help="use this vLLM instead of starting one")
    ap.add_argument("--teacher", type=Path, default=TEACHER_DIR, help="model dir (and tokenizer)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "campaign")
    args = ap.parse_args(argv)

    cfg = QUICK if args.quick else CampaignConfig()
    overrides = {
        name: getattr(args, name)
        for name in ("budget", "honest", "batch", "hydra_keys", "window_h", "compression",
                     "seed", "student_steps", "student_batch", "eval_n", "thresholds")
        if getattr(args, name) is not None
    }  # fmt: skip
    cfg = replace(cfg, **overrides)
    phases = ["undefended"] if args.undefended else ["defended"] if args.defended else PHASES
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sims = population(cfg)
    slow = next((s for s in sims if isinstance(s, LowAndSlow)), None)
    if slow is not None:
        print(f"low-and-slow rate: {slow.rate_per_min():.1f}/min (static limit "
              f"{NOMINAL_LIMITS['requests_per_minute']}/min)", flush=True)  # fmt: skip

    meta = {"config": json.loads(json.dumps(asdict(cfg))), "teacher": str(args.teacher)}
    if args.students_only:
        results = [load_phase(p, out) for p in phases if (out / f"{p}.json").exists()]
    else:
        results = run_phases(phases, cfg, args.vllm_url, args.teacher, out, sims, meta)
    if not args.no_students:
        train_students(results, cfg, args.teacher, out / "students.json", args.student_actors)
        for result in results:
            save_phase(result, meta, out)

    summaries = {}
    for phase in PHASES:
        path = out / f"{phase}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if _traffic(data["meta"]["config"]) == _traffic(meta["config"]):
                summaries[phase] = data
    report = markdown(meta, summaries)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"meta": meta, "phases": summaries}, indent=2))
    print(report)


def _traffic(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the traffic: a defended and an undefended run compare only if
    they agree on these (the thresholds apply to the defended phase alone)."""
    ignored = ("student_steps", "student_batch", "eval_n", "thresholds")
    return {k: v for k, v in config.items() if k not in ignored}


def run_phases(
    phases: list[str] | tuple[str, ...],
    cfg: CampaignConfig,
    vllm_url: str | None,
    teacher: Path,
    out: Path,
    sims: list[Simulator],
    meta: dict[str, Any],
) -> list[PhaseResult]:
    """Run the phases (starting vLLM unless ``vllm_url`` is given) and save each one."""
    vllm = None
    try:
        if vllm_url is None:
            vllm = start_vllm(teacher, out)
            vllm_url = vllm.url
        results = []
        for phase in phases:
            result = run_phase(phase, cfg, vllm_url.rstrip("/"), out, sims)
            save_phase(result, meta, out)
            results.append(result)
        return results
    finally:
        if vllm is not None:
            vllm.stop()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
