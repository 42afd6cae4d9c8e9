"""Soak: the guard at half saturation for a long while, with many clients cycling.

    .venv/bin/python -m load_tests.soak --minutes 30 --mode memory   # or --mode redis
    .venv/bin/python -m load_tests.soak --minutes 1 --clients 2000 --sample-s 5   # the suite's

A real guard (``guard-server serve``, one worker) in front of the fast fake upstream
(``benchmarks.fake_upstream``), with Redis in ``--mode redis``. Clients: ``--clients`` API
keys in a generated policy file (one key per client, the default tier: the product
authenticates by key, so 100,000 clients are 100,000 keys), used in turn. First a short
closed-loop burst measures saturation; then requests go out at half that rate (80 % whole
chat answers, 20 % streams). Every ``--sample-s`` the guard's RSS and open file descriptors
(from /proc), its asyncio tasks (``guard_event_loop_tasks``) and Redis' ``used_memory`` are
sampled. At the end:

- each series' slope over the measured window (after the first third: the warm-up, in
  which every client should be seen once, so ``clients / rate`` at most a third of the run;
  the report's ``cycle_s``) must be flat: its growth over the window at most
  max(floor, 3 % of its mean) (floors: 8 MiB, 64 fds, 64 tasks, 4 MiB: what the 32
  connections of the load and their upstream and Redis connections may add by themselves);
- no 5xx, no transport error;
- limits exact: a probe client limited to 30 requests a minute, sent 3 a second throughout,
  was admitted 30 + elapsed seconds / 2 times (a bucket of 30 refilled at 0.5/s), to within
  +1 (no over-admission) and -4 (none refused that the bucket held).

The report (``--out``, JSON) has every sample, the slopes and the tallies; the exit status
is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import (
    POLICIES,
    ChildProcess,
    GuardProcess,
    RedisProcess,
    free_port,
    metric_value,
    write_config,
)

PROBE_KEY = "sk-soak-probe"
PROBE_PER_MINUTE = 30
PROBE_RATE = 3.0  # requests a second: over its limit all the time
CONNECTIONS = 32
FLOORS = {
    "rss_bytes": 8 << 20,
    "open_fds": 2 * CONNECTIONS,
    "tasks": 2 * CONNECTIONS,
    "redis_used_memory": 4 << 20,
}
"""The growth a series may show over the measured window in any case: the noise of the load
itself (each client connection may come with an upstream and a Redis connection, and a task)."""
RELATIVE = 0.03
SATURATION_S = 5.0
BACKLOG = 256


def client_key(index: int) -> str:
    """The API key of soak client ``index``."""
    return f"sk-soak-{index:06d}"


def write_clients(path: Path, clients: int) -> None:
    """The policy file: ``clients`` default-tier clients, one key each, and the probe."""
    entries: dict[str, Any] = {
        f"soak-{i}": {"tier": "default", "keys": [hash_key(client_key(i))]} for i in range(clients)
    }
    entries["soak-probe"] = {
        "tier": "default",
        "keys": [hash_key(PROBE_KEY)],
        "limits": {"requests_per_minute": PROBE_PER_MINUTE},
    }
    path.write_text(yaml.dump({"clients": entries}, Dumper=yaml.CSafeDumper))


def body(index: int, stream: bool) -> dict[str, Any]:
    """A small chat request (a few distinct questions, as honest traffic has)."""
    return {
        "model": "teacher",
        "messages": [{"role": "user", "content": f"Question {index % 50}: what is 12 + 7?"}],
        "max_tokens": 8,
        "stream": stream,
    }


@dataclass
class Tally:
    """What the load saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    probe: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # the first bodies of 5xx answers
    skipped: int = 0  # due while BACKLOG requests were waiting


async def send(
    session: aiohttp.ClientSession, url: str, key: str, stream: bool, seq: int
) -> tuple[int, bytes]:
    """One request, read to its end; its status and body."""
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(url, json=body(seq, stream), headers=headers) as response:
        return response.status, await response.read()


async def one(  # type: ignore[no-untyped-def]
    session, url: str, key: str, stream: bool, seq: int, tally: Tally, probe: bool = False
) -> None:
    """:func:`send`, counted (a transport error by its type, a 5xx's body kept)."""
    try:
        status, answer = await send(session, url, key, stream, seq)
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.transport_errors[type(exc).__name__] += 1
        return
    (tally.probe if probe else tally.statuses)[status] += 1
    if status >= 500 and len(tally.errors) < 20:
        tally.errors.append(f"{status} {answer[:300]!r}")


async def saturation(
    session: aiohttp.ClientSession, url: str, clients: int, seconds: float = SATURATION_S
) -> float:
    """Requests a second the guard answers with :data:`CONNECTIONS` requests always in
    flight (which also opens every connection the soak will use)."""
    done = 0
    seq = itertools.count()
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            i = next(seq)
            await send(session, url, client_key(i % clients), False, i)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return done / (time.monotonic() - started)


async def paced(  # type: ignore[no-untyped-def]
    session: aiohttp.ClientSession,
    url: str,
    clients: int,
    rate: float,
    seconds: float,
    tally: Tally,
    on_tick,
) -> None:
    """Requests at ``rate`` a second for ``seconds``, clients in turn, over at most
    :data:`CONNECTIONS` connections; the probe at :data:`PROBE_RATE`. Open loop, but
    bounded: past :data:`BACKLOG` requests waiting, a due request is skipped (counted in
    ``tally.skipped``) rather than queued, so a slow spell of the machine cannot pile up
    connections and tasks that would read as a leak. ``on_tick()`` runs between batches."""
    tasks: set[asyncio.Task[None]] = set()

    def start(request: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(request)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    started = time.monotonic()
    due = probes = 0
    while (elapsed := time.monotonic() - started) < seconds:
        while due < int(elapsed * rate):
            if len(tasks) < BACKLOG:
                start(one(session, url, client_key(due % clients), due % 5 == 0, due, tally))
            else:
                tally.skipped += 1
            due += 1
        if probes < int(elapsed * PROBE_RATE):
            probes += 1
            start(one(session, url, PROBE_KEY, False, probes, tally, probe=True))
        await on_tick()
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)


def proc_rss(pid: int) -> int:
    """Resident memory of ``pid``, in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` against ``t`` (units per second)."""
    points = [(s["t"], s[key]) for s in samples if key in s]
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    num = sum((t - mean_t) * (v - mean_v) for t, v in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    return num / den if den else 0.0


def flatness(samples: list[dict[str, float]]) -> dict[str, dict[str, float | bool]]:
    """Per series, over the samples after the first third: slope, growth over the window,
    the growth allowed, and whether it is flat."""
    window = samples[len(samples) // 3 :]
    span = window[-1]["t"] - window[0]["t"] if len(window) > 1 else 0.0
    out: dict[str, dict[str, float | bool]] = {}
    for key, floor in FLOORS.items():
        values = [s[key] for s in window if key in s]
        if not values:
            continue
        per_s = slope(window, key)
        allowed = max(floor, RELATIVE * sum(values) / len(values))
        growth = per_s * span
        out[key] = {"slope_per_min": per_s * 60, "growth": growth, "allowed": allowed,
                    "flat": growth <= allowed}  # fmt: skip
    return out


@dataclass
class SoakReport:
    """What one soak run measured."""

    mode: str
    clients: int
    seconds: float
    saturation_rps: float
    rate: float
    cycle_s: float  # one pass over every client: the warm-up (a third) should cover it
    requests: int
    statuses: dict[str, int]
    skipped: int
    transport_errors: dict[str, int]
    errors: list[str]
    probe_admitted: int
    probe_allowed: float
    samples: list[dict[str, float]]
    flatness: dict[str, dict[str, float | bool]]
    failures: list[str]


def soak(mode: str, minutes: float, clients: int, sample_s: float, work: Path) -> SoakReport:
    """Run one soak in ``work``; the report (its ``failures`` empty when every check holds)."""
    upstream_port = free_port()
    argv = [sys.executable, "-m", "benchmarks.fake_upstream", "--port", str(upstream_port)]
    upstream = ChildProcess("fake upstream", argv, work / "upstream.log")
    redis_server = RedisProcess(log_path=work / "redis.log") if mode == "redis" else None
    write_clients(work / "soak-clients.yaml", clients)
    state: dict[str, Any] = {"backend": "memory"}
    if redis_server is not None:
        state = {"backend": "redis", "redis_url": redis_server.url, "on_failure": "closed",
                 "timeout_s": 2}  # fmt: skip
    config = write_config(
        work,
        [f"http://127.0.0.1:{upstream_port}"],
        policies=[POLICIES / "default.yaml", work / "soak-clients.yaml"],
        state=state,
        logging={"access_log": False},
    )
    guard = GuardProcess(config, work / "guard.log", log_level="WARNING")
    try:
        upstream.spawn().wait_http(f"http://127.0.0.1:{upstream_port}/health", 30)
        if redis_server is not None:
            redis_server.start()
        guard.start(timeout_s=300)
        guard.wait_ready()
        return asyncio.run(_drive(guard, redis_server, mode, minutes, clients, sample_s))
    finally:
        guard.stop()
        upstream.stop()
        if redis_server is not None:
            redis_server.stop()


async def _drive(
    guard: GuardProcess,
    redis_server: RedisProcess | None,
    mode: str,
    minutes: float,
    clients: int,
    sample_s: float,
) -> SoakReport:
    url = guard.base_url + "/chat/completions"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONNECTIONS),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        return await _soak(session, url, guard, redis_server, mode, minutes, clients, sample_s)


async def _soak(
    session: aiohttp.ClientSession,
    url: str,
    guard: GuardProcess,
    redis_server: RedisProcess | None,
    mode: str,
    minutes: float,
    clients: int,
    sample_s: float,
) -> SoakReport:
    saturated = await saturation(session, url, clients)
    rate = saturated / 2
    print(f"saturation {saturated:.0f} req/s; soaking at {rate:.0f} req/s for {minutes:g} min")
    store = redis.Redis(port=redis_server.port) if redis_server is not None else None
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    next_sample = [started]

    async def on_tick() -> None:
        now = time.monotonic()
        if now < next_sample[0]:
            return
        next_sample[0] += sample_s
        sample = {"t": now - started, "rss_bytes": proc_rss(guard.pid),
                  "open_fds": proc_fds(guard.pid)}  # fmt: skip
        text = await asyncio.to_thread(guard.metrics)
        sample["tasks"] = metric_value(text, "guard_event_loop_tasks")
        if store is not None:
            sample["redis_used_memory"] = (await asyncio.to_thread(store.info, "memory"))[
                "used_memory"
            ]
        samples.append(sample)
        print("  " + "  ".join(f"{k} {v:,.0f}" for k, v in sample.items()), flush=True)

    tally = Tally()
    await paced(session, url, clients, rate, minutes * 60, tally, on_tick)
    elapsed = time.monotonic() - started
    statuses = {str(k): v for k, v in sorted(tally.statuses.items())}
    flat = flatness(samples)
    failures = [f"{key} grew {v['growth']:,.0f} (allowed {v['allowed']:,.0f})"
                for key, v in flat.items() if not v["flat"]]  # fmt: skip
    server_errors = sum(v for k, v in tally.statuses.items() if k >= 500)
    server_errors += sum(v for k, v in tally.probe.items() if k >= 500)
    if server_errors:
        failures.append(f"{server_errors} answers were 5xx")
    if tally.transport_errors:
        failures.append(f"transport errors: {dict(tally.transport_errors)}")
    unexpected = set(tally.statuses) - {200}
    if unexpected:
        failures.append(f"statuses other than 200 for the soak clients: {statuses}")
    allowed = PROBE_PER_MINUTE + elapsed * PROBE_PER_MINUTE / 60 + 1
    if tally.probe[200] > allowed:
        failures.append(f"over-admission: the probe got {tally.probe[200]} > {allowed:.0f}")
    elif tally.probe[200] < allowed - 4:
        failures.append(f"under-admission: the probe got {tally.probe[200]} < {allowed - 4:.0f}")
    return SoakReport(
        mode=mode,
        clients=clients,
        seconds=elapsed,
        saturation_rps=saturated,
        rate=rate,
        cycle_s=clients / rate,
        requests=sum(tally.statuses.values()),
        statuses=statuses,
        skipped=tally.skipped,
        transport_errors=dict(tally.transport_errors),
        errors=tally.errors,
        probe_admitted=tally.probe[200],
        probe_allowed=allowed,
        samples=samples,
        flatness=flat,
        failures=failures,
    )


def main() -> None:
    """Command line; exit status 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--mode", choices=["memory", "redis"], default="memory")
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--out", type=Path, help="write the report here (JSON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        report = soak(args.mode, args.minutes, args.clients, args.sample_s, Path(work))
    data = asdict(report)
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    print(json.dumps({k: v for k, v in data.items() if k != "samples"}, indent=1))
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
