"""Process CPU per request of each request stage, in process: where a client's time goes.

    .venv/bin/python -m benchmarks.request_stages --clients pass,default --rounds 3
    .venv/bin/python -m benchmarks.request_stages --against /tmp/before   # before vs after

The stages of a chat request run on one event loop, as the guard runs them, with the
benchmark's policy and clients (``benchmarks.run``), the fake upstream's canned response in
place of the upstream call and ``time.process_time`` around each stage: authentication,
parsing and validation; the tier policy; the canonical input; the score; the plan;
admission; the upstream rewrite; the response transform; settlement and metrics. No socket,
no HTTP: what the pipeline itself costs per request, steady under a busy machine (CPU time,
not wall time). A client's requests cycle through 64 prompts, as wrk's do.

With ``--against`` another checkout (a ``git worktree`` with ``benchmarks.run``) runs the
same measurement in turn with this one, round by round, and the medians of both are
printed side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROMPTS = 64


async def _measure(clients: list[str], requests: int, body: str) -> dict[str, dict[str, float]]:
    import orjson
    from multidict import CIMultiDict, CIMultiDictProxy
    from prometheus_client import CollectorRegistry

    from benchmarks import fake_upstream
    from benchmarks.run.bench import KEYS, SECRET, SECRET_ENV, Bench
    from benchmarks.run.options import Layout, parse_options
    from guard_server.app import _review_state
    from guard_server.config.loader import load_settings
    from guard_server.metrics import GuardMetrics
    from guard_server.openai_fields import Endpoint
    from guard_server.pipeline.admit import Admitter
    from guard_server.pipeline.auth import authenticate
    from guard_server.pipeline.canonicalize import canonicalize
    from guard_server.pipeline.context import RequestContext
    from guard_server.pipeline.plan import Planner
    from guard_server.pipeline.policy import apply_tier_policy
    from guard_server.pipeline.record import record
    from guard_server.pipeline.rewrite import rewrite_for_upstream
    from guard_server.pipeline.score import RiskScorer
    from guard_server.pipeline.transform import transform_response
    from guard_server.pipeline.validate import parse_json_object, validate_request
    from guard_server.state.memory import MemoryStore
    from guard_server.testing import DEFAULT_POLICY

    os.environ.setdefault(SECRET_ENV, SECRET)
    bench = Bench(parse_options(["--no-pin"]), Layout.make(False), Path(tempfile.mkdtemp()))
    bench.write_bodies()
    policies = [DEFAULT_POLICY, bench.write_policy()]
    settings = load_settings(bench.write_guard_config("g", "http://127.0.0.1:9", policies, {}))
    metrics = GuardMetrics(CollectorRegistry())
    store = MemoryStore()
    admitter = Admitter(store, metrics, fail_open=False, slot_ttl_s=600)
    holder = type("Holder", (), {"current": settings})()
    stages = (
        ("policy", apply_tier_policy),
        ("canonicalize", canonicalize),
        ("score", RiskScorer(store, metrics)),
        ("plan", Planner(metrics, _review_state(store, holder))),
        ("admit", admitter),
    )
    template = bench.bodies[body].read_text()
    raws = [template.replace("{n}", str(i)).encode() for i in range(PROMPTS)]
    path = "/v1/chat/completions"
    clock = time.process_time
    out = {}
    for client in clients:
        spent: dict[str, float] = defaultdict(float)
        headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {KEYS[client]}"}))
        for i in range(requests):
            started = clock()
            ctx = RequestContext(Endpoint.CHAT, settings, headers, time.perf_counter())
            await authenticate(ctx)
            ctx.body = parse_json_object(raws[i % PROMPTS])
            await validate_request(ctx)
            spent["auth, parse, validate"] += clock() - started
            for name, stage in stages:
                started = clock()
                await stage(ctx)
                spent[name] += clock() - started
            started = clock()
            payload = orjson.loads(rewrite_for_upstream(ctx, "teacher", True))
            spent["rewrite"] += clock() - started
            answer = fake_upstream.whole_response(path, *fake_upstream._shape(path, payload))
            started = clock()
            response = orjson.loads(answer)
            transform_response(ctx, response)
            orjson.dumps(response)
            spent["transform"] += clock() - started
            ctx.status = 200
            started = clock()
            admitter.settle(ctx)
            record(ctx, metrics)
            spent["settle, record"] += clock() - started
            if i % 256 == 0:
                await asyncio.sleep(0)  # let the settlements run
        out[client] = {name: 1e6 * seconds / requests for name, seconds in spent.items()}
        out[client]["total"] = sum(out[client].values())
    return out


def _run(root: Path | None, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One measurement in a fresh process, of this checkout or of ``root``'s code."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    argv += ["--clients", args.clients, "--requests", str(args.requests), "--body", args.body]
    home = root or Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(home)}
    result = subprocess.run(argv, cwd=home, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.request_stages", description=__doc__
    )
    parser.add_argument("--clients", default="pass,default", help="of: pass, default, default_lp")
    parser.add_argument("--requests", type=int, default=3000, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--body", default="chat", help="chat or chat_logprobs")
    parser.add_argument("--against", type=Path, help="another checkout, measured in turn")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        clients = args.clients.split(",")
        print(json.dumps(asyncio.run(_measure(clients, args.requests, args.body))))
        return
    sides = {"this": None} if args.against is None else {"other": args.against, "this": None}
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, root in sides.items():
            rounds[side].append(_run(root, args))
    print(f"µs of process CPU per request, median of {args.rounds} rounds")
    for client in args.clients.split(","):
        print(f"\n{client}: " + " | ".join(sides))
        for stage in rounds["this"][0][client]:
            medians = [statistics.median(r[client][stage] for r in rounds[s]) for s in sides]
            print(f"  {stage:<24}" + "".join(f"{m:9.1f}" for m in medians))


if __name__ == "__main__":
    main()
