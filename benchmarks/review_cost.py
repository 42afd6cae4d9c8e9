"""What the review workflow costs on the request path, and how fast a pin reaches a replica.

#     .venv/bin/python -m benchmarks.review_cost [--before DIR] [--requests N] [--pins N]
#     .venv/bin/python -m benchmarks.review_cost --quick    # smoke run (tests), seconds
#
# 1. plan stage, in process: the plan stage without review state (as before pins existed),
#    with it and no pin, and with 1,000 pins (one of them the caller's), interleaved rounds.
# 2. latency at concurrency 1 (fake upstream, default tier, detection on), interleaved like
#    ``benchmarks.client paired``: this checkout with the memory and the Redis backend and,
#    with ``--before DIR`` (a checkout of the code to compare with, for example
#    ``git archive main | tar -x -C DIR``; one that knows ``metrics.port``), the same two
#    setups from DIR.
# 3. propagation: two guards sharing Redis; a pin set on A (alternately deny and allow) is
#    followed at once by one request to B, which must already see it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml

from benchmarks import procs
from benchmarks.client import Target, paired
from benchmarks.loadgen import summary_ms
from guard_server.pipeline.auth import hash_key
from guard_server.testing import REPO, GuardProcess, RedisProcess, free_port, write_config

KEY = "sk-bench-review"
ADMIN_KEY = "sk-bench-review-admin"
BODY = {
    "model": "teacher",
    "messages": [{"role": "user", "content": "What is 2 + {n}?"}],
    "max_tokens": 8,
}


def plan_stage(rounds: int = 15, calls: int = 20_000) -> dict[str, float]:
    """Median ns per call of the plan stage, per setup."""
    from multidict import CIMultiDict, CIMultiDictProxy
    from prometheus_client import CollectorRegistry

    from guard_server.canonical import canonical_input
    from guard_server.config.loader import load_settings
    from guard_server.detection.scoring import Assessment
    from guard_server.metrics import GuardMetrics
    from guard_server.openai_fields import Endpoint
    from guard_server.pipeline.context import RequestContext
    from guard_server.pipeline.plan import Planner
    from guard_server.state.memory import MemoryStore
    from guard_server.state.review import MemoryReview, Pin

    settings = load_settings(REPO / "policies" / "guard.yaml")
    client = settings.clients_by_id["demo"]
    headers = CIMultiDictProxy(CIMultiDict())
    ctx = RequestContext(Endpoint.CHAT, settings, headers, 0.0, client=client)
    ctx.body = {**BODY, "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
    ctx.canonical = canonical_input(Endpoint.CHAT, ctx.body)
    ctx.assessment = Assessment(0.12, {"logprobs": 0.05, "max_top_logprobs": 0.07}, "pass")
    no_pins = MemoryReview(MemoryStore())
    pinned = MemoryReview(MemoryStore())
    until = time.time() + 3600
    for i in range(999):
        pinned._apply_pin(f"other-{i}", Pin("deny", until))
    pinned._apply_pin("demo", Pin("allow", until))
    planners = {
        "no review state (before)": Planner(GuardMetrics(CollectorRegistry())),
        "review state, no pin": Planner(GuardMetrics(CollectorRegistry()), no_pins),
        "review state, 1,000 pins": Planner(GuardMetrics(CollectorRegistry()), pinned),
    }
    samples: dict[str, list[float]] = {name: [] for name in planners}

    async def measure() -> None:
        for _ in range(rounds):
            for name, planner in planners.items():
                started = time.perf_counter()
                for _ in range(calls):
                    await planner(ctx)
                samples[name].append((time.perf_counter() - started) / calls * 1e9)

    asyncio.run(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def _config(directory: Path, code: Path, upstream: str, redis_url: str | None) -> Path:
    """A guard config; with Redis, its keys under the folder's name (its own state)."""
    clients = {"clients": {"bench": {"tier": "default", "keys": [hash_key(KEY)]}}}
    (directory / "clients.yaml").write_text(yaml.safe_dump(clients))
    sections: dict = {"admin": {"key_hash": hash_key(ADMIN_KEY)}}
    if redis_url:
        sections["state"] = {"backend": "redis", "redis_url": redis_url,
                             "key_prefix": directory.name}  # fmt: skip
    policies = [code / "policies" / "default.yaml", directory / "clients.yaml"]
    return write_config(directory, [upstream], policies=policies, **sections)


@contextlib.contextmanager
def _guard(
    name: str, code: Path, work: Path, upstream: str, redis: str | None, state: str = ""
) -> Iterator[str]:
    """A guard from ``code``; guards with the same ``state`` name share their Redis state."""
    directory = work / (state or name.replace(" ", "-"))
    directory.mkdir(exist_ok=True)
    config = _config(directory, code, upstream, redis)
    log = directory / f"{name.replace(' ', '-')}.log"
    proc = GuardProcess(config, log, env={"PYTHONPATH": str(code)}, cwd=code, name=name)
    proc.start()
    try:
        yield proc.url
    finally:
        proc.stop()


def latency(work: Path, upstream: str, redis: str, before: Path | None, requests: int) -> dict:
    """p50/p90/p99 per setup and the paired p50 difference to its `before` twin."""
    setups = [("after", REPO)] + ([("before", before)] if before else [])
    body_file = work / "body.json"
    body_file.write_text(json.dumps(BODY))
    with contextlib.ExitStack() as stack:
        targets = []
        for label, code in setups:
            for backend, url in (("memory", None), ("redis", redis)):
                name = f"{label} {backend}"
                base = stack.enter_context(_guard(name, code, work, upstream, url))
                targets.append(Target({"name": name, "url": base, "key": KEY,
                                       "body_file": str(body_file)}))  # fmt: skip
        result = asyncio.run(paired(targets, requests, warmup=50, max_s=600))["latency_s"]
    table = {name: summary_ms(values) for name, values in result.items()}
    for backend in ("memory", "redis"):
        after, old = result.get(f"after {backend}"), result.get(f"before {backend}")
        if after and old:
            differences = [a - b for a, b in zip(after, old, strict=False)]
            table[f"after {backend}"]["paired_diff_p50_ms"] = statistics.median(differences) * 1e3
            table[f"after {backend}"]["p50_ratio"] = statistics.median(after) / statistics.median(
                old
            )
    return table


def propagation(work: Path, upstream: str, redis: str, pins: int) -> dict:
    """How often B's very next request already obeys a pin just set on A."""

    async def run(a: str, b: str) -> dict:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        caller = {"Authorization": f"Bearer {KEY}"}
        put_s, obeyed = [], 0
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{b}/v1/chat/completions", json=BODY, headers=caller) as r:
                await r.read()
            for i in range(pins):
                action = "deny" if i % 2 == 0 else "allow"
                started = time.perf_counter()
                async with http.put(
                    f"{a}/admin/clients/bench/pin",
                    json={"action": action, "expires_in_s": 600},
                    headers=admin,
                ) as r:
                    assert r.status == 200, await r.text()
                put_s.append(time.perf_counter() - started)
                async with http.post(f"{b}/v1/chat/completions", json=BODY, headers=caller) as r:
                    await r.read()
                    obeyed += r.status == (403 if action == "deny" else 200)
        return {"pins": pins, "next_request_on_b_obeyed": obeyed, "put": summary_ms(put_s)}

    with (
        _guard("a", REPO, work, upstream, redis, state="shared") as a,
        _guard("b", REPO, work, upstream, redis, state="shared") as b,
    ):
        return asyncio.run(run(a, b))


def main() -> None:
    """Command line: print one JSON object with every figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--pins", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few of everything")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.pins = 50, 10
    report: dict = {"plan_stage_ns": plan_stage(*((3, 2000) if args.quick else ()))}
    with tempfile.TemporaryDirectory(prefix="review-cost-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = procs.fake_upstream(upstream_port, work / "upstream.log", None).start()
        redis = RedisProcess(log_path=work / "redis.log").start()
        try:
            upstream.wait_http(f"http://127.0.0.1:{upstream_port}/health", 30)
            redis_url = redis.url
            upstream_url = f"http://127.0.0.1:{upstream_port}"
            report["latency_c1"] = latency(
                work, upstream_url, redis_url, args.before, args.requests
            )
            report["propagation"] = propagation(work, upstream_url, redis_url, args.pins)
        finally:
            upstream.stop()
            redis.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
