"""Run every guard benchmark in one go; write a Markdown report and a JSON file."""

#     .venv/bin/python -m benchmarks.run [--quick] [--out DIR]
#
# Starts (all on loopback) the fake upstream, redis, five guards (pass-through, default
# policy and default + limits with 1 worker and the memory store; default + limits with Redis;
# 2 workers with Redis), LiteLLM (if ``.bench-venv`` exists; see
# ``scripts/install-bench-tools.sh``), then measures: saturation with wrk, fixed-rate latency
# with hey, paired latency at concurrency 1 and stream timing with the Python client, a py-spy
# profile, the memory/overhead curve against the number of clients, and, when the bundled
# teacher's weights exist, real vLLM. See BENCHMARKS.md.

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import loadgen, procs
from benchmarks.loadgen import summary_ms
from benchmarks.profile_summary import summarize
from benchmarks.report import render_markdown
from guard_server.pipeline.auth import hash_key

REPO = procs.REPO
DEFAULT_OUT = REPO / "benchmarks" / "results"
BENCH_VENV = REPO / ".bench-venv"
SECRET_ENV = "GUARD_BENCH_SECRET"
SECRET = "benchmark-secret-not-for-production-0123456789"
KEYS = {
    "pass": "sk-bench-pass",
    "default": "sk-bench-default",
    "default_lp": "sk-bench-default-lp",
    "limited": "sk-bench-limited",
    "litellm": "sk-bench-litellm",
}
# Limits high enough never to refuse: the cost of checking them is what is measured.
BIG_LIMITS = {
    "requests_per_minute": 100_000_000,
    "tokens_per_minute": 10_000_000_000,
    "concurrent_requests": 100_000,
}


PHASES = (
    "upstream_capacity",
    "saturation",
    "policy_cost",
    "fixed_rate",
    "latency_c1",
    "stream_timing",
    "profile",
    "guard_metrics",
    "scale",
    "e2e_vllm",
)
# Phases that need every service (guards, redis, LiteLLM) running.
SERVICE_PHASES = PHASES[1:8]


@dataclass
class Options:
    """What to run and for how long."""

    quick: bool
    out: Path
    duration_s: float
    concurrencies: list[int]
    sat_concurrency: int
    latency_requests: int
    stream_requests: int
    stream_chunks: int
    scale_clients: list[int]
    http_populate_max: int
    litellm: bool
    vllm: bool
    profile: bool
    pin: bool
    rate_concurrency: int = 8
    vllm_model: Path | None = None
    only: set[str] = field(default_factory=set)


@dataclass
class Layout:
    """Which CPUs the load side (wrk, hey, client, fake upstream, redis) and a 1-worker guard
    (and LiteLLM) run on; the 2-worker guard gets every CPU."""

    load: set[int] | None
    guard: set[int] | None
    every: set[int]

    @staticmethod
    def make(pin: bool) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return Layout(None, None, set(cpus))
        return Layout(set(cpus[:-1]), {cpus[-1]}, set(cpus))

    def describe(self) -> str:
        if self.guard is None:
            return "not pinned"
        return (
            f"1-worker guard and LiteLLM on CPU {_cpus(self.guard)}; fake upstream, redis and "
            f"load generators on CPU {_cpus(self.load)}; the 2-worker guard on CPUs "
            f"{_cpus(self.every)}"
        )


def _cpus(cpus: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


@dataclass
class Service:
    """A running server under test."""

    name: str
    url: str
    proc: procs.Proc
    workers: int = 1
    backend: str = ""


@dataclass
class Bench:
    """The state of one benchmark run."""

    options: Options
    layout: Layout
    work: Path
    running: list[procs.Proc] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    bodies: dict[str, Path] = field(default_factory=dict)

    # ---------------------------------------------------------------- processes

    def start(self, proc: procs.Proc) -> procs.Proc:
        self.running.append(proc.start())
        return proc

    def stop(self, proc: procs.Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            with contextlib.suppress(Exception):
                proc.stop()
        self.running.clear()

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    # ---------------------------------------------------------------- files

    def write_bodies(self) -> None:
        chat = {
            "model": "teacher",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Question {n}: what is 12 + 7?"},
            ],
            "max_tokens": 16,
            "temperature": 0,
        }
        logprobs = {"logprobs": True, "top_logprobs": 5}
        chunks = self.options.stream_chunks
        variants = {
            "chat": chat,
            "chat_logprobs": {**chat, **logprobs},
            "stream": {**chat, "stream": True},
            "stream_long": {**chat, "stream": True, "max_tokens": chunks},
            "stream_long_logprobs": {**chat, "stream": True, "max_tokens": chunks, **logprobs},
            "stream_logprobs": {**chat, "stream": True, **logprobs},
        }
        for name, body in variants.items():
            path = self.work / f"body_{name}.json"
            path.write_text(json.dumps(body))
            self.bodies[name] = path
            fixed = self.work / f"body_{name}_fixed.json"
            fixed.write_text(json.dumps(body).replace("{n}", "0"))
            self.bodies[name + "_fixed"] = fixed

    def write_policy(self) -> Path:
        clients = {
            "bench-pass": {"tier": "passthrough", "keys": [hash_key(KEYS["pass"])]},
            "bench-default": {"tier": "default", "keys": [hash_key(KEYS["default"])]},
            "bench-default-lp": {"tier": "default", "keys": [hash_key(KEYS["default_lp"])]},
            "bench-limited": {
                "tier": "default",
                "keys": [hash_key(KEYS["limited"])],
                "limits": BIG_LIMITS,
            },
        }
        policy = {
            "tiers": {
                # Pass-through: every field allowed, no bounds, no logprob noise, no
                # detection, no limits.
                "passthrough": {
                    "models": ["*"],
                    "allow_fields": ["@openai", "@vllm_sampling", "@vllm_advanced"],
                    "bounds": dict.fromkeys(("max_tokens", "n", "temperature", "prompt_logprobs")),
                    "max_prompts": 1024,
                    "logprobs": {
                        "max_top": 20,
                        "noise": {"scale": 0},
                        "quantize": {"mode": "none"},
                        "allow_echo": True,
                        "with_constraints": "allow",
                    },
                    "logit_bias": {"mode": "allow", "max_abs": 100, "with_logprobs": "allow"},
                    "seed": "allow",
                    "detection": {"enabled": False},
                }
            },
            "clients": clients,
        }
        path = self.work / "bench-policy.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        return path

    def write_guard_config(
        self, name: str, upstream: str, policies: list[Path], state: dict[str, Any]
    ) -> Path:
        config = {
            "server": {"host": "127.0.0.1", "port": 0},
            "upstreams": {"teacher": {"urls": [upstream]}},
            "secret": {"env": SECRET_ENV},
            "state": state,
            "policies": [str(p) for p in policies],
        }
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # ---------------------------------------------------------------- services

    def start_services(self) -> None:
        layout = self.layout
        upstream_port = procs.free_port()
        upstream = self.start(
            procs.fake_upstream(upstream_port, self.log("fake_upstream"), layout.load)
        )
        up_url = f"http://127.0.0.1:{upstream_port}"
        self.services["direct"] = Service("fake upstream (direct)", up_url, upstream)
        redis_port = procs.free_port()
        redis = self.start(procs.redis_server(redis_port, self.log("redis"), layout.load))
        self.services["redis"] = Service("redis", f"redis://127.0.0.1:{redis_port}", redis)
        policies = [REPO / "policies" / "default.yaml", self.write_policy()]
        prefix = f"bench{os.getpid()}"
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        # One process per setup, so that no setup runs warm on another's requests.
        guards = {
            "g_pass": ("memory", 1),
            "g_default": ("memory", 1),
            "g_limits": ("memory", 1),
            "g_redis": ("redis", 1),
            "g_2w": ("redis", 2),
        }
        env = {SECRET_ENV: SECRET}
        for name, (backend, workers) in guards.items():
            state = {}
            if backend == "redis":
                state = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix + name}
            config = self.write_guard_config(name, up_url, policies, state)
            port = procs.free_port()
            cpus = layout.guard if workers == 1 else layout.every
            proc = self.start(procs.guard(config, port, self.log(name), cpus, workers, env))
            self.services[name] = Service(
                f"guard {name.removeprefix('g_')} ({workers}w {backend})",
                f"http://127.0.0.1:{port}",
                proc,
                workers,
                backend,
            )
        if self.options.litellm:
            self.services["litellm"] = self.start_litellm(up_url)
            self.results["litellm_started_at"] = time.monotonic()
        upstream.wait_http(up_url + "/health", 30)
        procs.wait_redis(redis_port)
        for name in guards:
            service = self.services[name]
            service.proc.wait_http(service.url + "/readyz", 60)
        for service in self.services.values():  # one request each, so pools are warm
            if service.name != "redis" and service is not self.services.get("litellm"):
                self.warm(service)

    def wait_litellm(self) -> None:
        """LiteLLM starts slowly: wait for it only when a phase needs it."""
        service = self.services.get("litellm")
        if service is None or "litellm_startup_s" in self.results:
            return
        service.proc.wait_http(service.url + "/health/liveliness", 180)
        started = self.results.pop("litellm_started_at")
        self.results["litellm_startup_s"] = round(time.monotonic() - started, 1)
        self.warm(service)

    def start_upstream_only(self) -> None:
        """Just the fake upstream (for the phases that start their own guards)."""
        port = procs.free_port()
        upstream = self.start(
            procs.fake_upstream(port, self.log("fake_upstream"), self.layout.load)
        )
        url = f"http://127.0.0.1:{port}"
        self.services["direct"] = Service("fake upstream (direct)", url, upstream)
        upstream.wait_http(url + "/health", 30)

    def start_litellm(self, upstream_url: str) -> Service:
        config = {
            "model_list": [
                {
                    "model_name": "teacher",
                    "litellm_params": {
                        "model": "openai/teacher",
                        "api_base": upstream_url + "/v1",
                        "api_key": "sk-upstream",
                    },
                }
            ],
            "general_settings": {"master_key": KEYS["litellm"]},
            "litellm_settings": {"set_verbose": False, "telemetry": False},
        }
        path = self.work / "litellm.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = procs.free_port()
        argv = [
            str(BENCH_VENV / "bin" / "litellm"), "--config", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1",
        ]  # fmt: skip
        env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "True",
        }
        proc = procs.Proc("litellm", argv, self.log("litellm"), self.layout.guard, env, self.work)
        self.start(proc)
        self.results["litellm_command"] = " ".join(argv)
        return Service("LiteLLM proxy 1 worker", f"http://127.0.0.1:{port}", proc)

    def warm(self, service: Service) -> None:
        key = self.key_for(service)
        body = self.bodies["chat_fixed"].read_bytes()
        request = urllib.request.Request(
            service.url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def key_for(self, service: Service, key: str = "pass") -> str:
        if service.name.startswith("LiteLLM"):
            return KEYS["litellm"]
        if service.name.startswith("fake upstream"):
            return "sk-upstream"
        return KEYS[key]

    # ---------------------------------------------------------------- measuring

    def measured(self, watch: list[Service], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``run`` while counting the CPU of ``watch`` and of the rest of the machine."""
        before = [s.proc.cpu_seconds() for s in watch]
        own = procs.own_cpu_seconds()
        busy = procs.system_busy_seconds()
        started = time.monotonic()
        row = run()
        wall = time.monotonic() - started
        used = [s.proc.cpu_seconds() - b for s, b in zip(watch, before, strict=True)]
        other = (procs.system_busy_seconds() - busy) - (procs.own_cpu_seconds() - own)
        row["cpu_cores"] = {s.name: round(u / wall, 2) for s, u in zip(watch, used, strict=True)}
        row["other_load_cores"] = round(max(0.0, other) / wall, 2)
        return row

    def saturate(
        self,
        label: str,
        service_name: str,
        key: str,
        body: str,
        concurrency: int,
        *,
        group: str,
        policy: str,
        rotate_keys: int = 0,
    ) -> dict[str, Any]:
        service = self.services[service_name]
        watch = [service]
        if service_name != "direct":
            watch.append(self.services["direct"])
        if service.backend == "redis":
            watch.append(self.services["redis"])

        def run() -> dict[str, Any]:
            return loadgen.wrk(
                service.url,
                body_file=self.bodies[body],
                key=self.key_for(service, key),
                concurrency=concurrency,
                duration_s=self.options.duration_s,
                rotate_keys=rotate_keys,
                cpus=self.layout.load,
            )

        row = self.measured(watch, run)
        cores = row["cpu_cores"][service.name]
        row.update(
            server_cores=cores,
            rps_per_core=row["rps"] / cores if cores > 0 else None,
            label=label,
            group=group,
            target=service.name,
            policy=policy,
            backend=service.backend or "-",
            workers=service.workers,
            body=body,
        )
        print(
            f"  {label:<44} c={concurrency:<3} {row['rps']:8.0f} req/s  "
            f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}",
            flush=True,
        )
        return row


# -------------------------------------------------------------------- phases


def phase_upstream_capacity(bench: Bench) -> dict[str, Any]:
    """The fake upstream alone on the guard's CPU, loaded by wrk from the load CPUs."""
    port = procs.free_port()
    proc = bench.start(
        procs.fake_upstream(port, bench.log("upstream_capacity"), bench.layout.guard)
    )
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(url + "/health", 30)
        service = Service("fake upstream (capacity)", url, proc)
        rows = []
        for body in ("chat", "stream"):

            def run(body: str = body) -> dict[str, Any]:
                return loadgen.wrk(
                    url,
                    body_file=bench.bodies[body],
                    key=None,
                    concurrency=bench.options.sat_concurrency,
                    duration_s=bench.options.duration_s,
                    cpus=bench.layout.load,
                )

            row = bench.measured([service], run)
            row["body"] = body
            rows.append(row)
            print(f"  fake upstream alone, {body:<6} {row['rps']:8.0f} req/s", flush=True)
    finally:
        bench.stop(proc)
    return {"cpus": _cpus(bench.layout.guard) or "any", "rows": rows}


def phase_saturation(bench: Bench) -> list[dict[str, Any]]:
    """wrk at fixed concurrency against each target, one at a time."""
    bench.wait_litellm()
    o = bench.options
    sc = o.sat_concurrency
    has_litellm = "litellm" in bench.services
    every, both = o.concurrencies, sorted({sc, max(o.concurrencies)})
    # (label, service, client key, body, concurrencies, table group, policy)
    plan: list[tuple[str, str, str, str, list[int], str, str]] = [
        ("direct (fake upstream)", "direct", "pass", "chat", every, "main", "-"),
        ("guard pass-through", "g_pass", "pass", "chat", every, "main", "pass"),
        ("guard default policy", "g_default", "default", "chat", [sc], "main", "default"),
        ("direct + logprobs(5)", "direct", "pass", "chat_logprobs", [sc], "logprobs", "-"),
        ("guard pass-through + logprobs(5)", "g_pass", "pass", "chat_logprobs", [sc],
         "logprobs", "pass"),
        ("guard default + logprobs(5)", "g_default", "default_lp", "chat_logprobs", [sc],
         "logprobs", "default"),
        ("guard default + limits, memory", "g_limits", "limited", "chat", [sc], "state",
         "limits"),
        ("guard default + limits, redis", "g_redis", "limited", "chat", [sc], "state workers",
         "limits"),
        ("guard pass-through, redis cfg", "g_redis", "pass", "chat", [sc],
         "workers", "pass"),
        ("guard pass-through, 2 workers", "g_2w", "pass", "chat", both, "workers", "pass"),
        ("guard default + limits, 2 workers (redis)", "g_2w", "limited", "chat", [sc],
         "workers", "limits"),
        ("direct stream", "direct", "pass", "stream", [sc], "stream", "-"),
        ("guard pass-through stream", "g_pass", "pass", "stream", [sc], "stream", "pass"),
        ("guard default stream", "g_default", "default", "stream", [sc], "stream", "default"),
        ("guard default stream + logprobs(5)", "g_default", "default_lp", "stream_logprobs",
         [sc], "stream", "default"),
    ]  # fmt: skip
    if has_litellm:
        plan.insert(2, ("LiteLLM proxy", "litellm", "pass", "chat", every, "main", "-"))
        plan.append(("LiteLLM proxy stream", "litellm", "pass", "stream", [sc], "stream", "-"))
    rows = []
    for label, service, key, body, concurrencies, group, policy in plan:
        for concurrency in concurrencies:
            rows.append(
                bench.saturate(label, service, key, body, concurrency, group=group, policy=policy)
            )
    return rows


POLICY_COST_ROUNDS = 5


def phase_policy_cost(bench: Bench) -> dict[str, Any]:
    """The default policy's cost: one guard process serving a pass-through client and a
    default-tier client in turn (wrk at saturation), several rounds, median of the rounds'
    ratios. The same process serves both, so the ratio is the policy's alone; the
    pass-through guard process (``g_pass``) is measured in the same rounds for reference."""
    sc = bench.options.sat_concurrency
    steps = (
        ("pass", "guard pass-through", "g_pass", "pass"),
        ("pass_on_default", "guard default process, pass-through client", "g_default", "pass"),
        ("default", "guard default policy", "g_default", "default"),
    )
    rounds = []
    for index in range(POLICY_COST_ROUNDS):
        rps = {
            name: bench.saturate(label, service, key, "chat", sc, group="policy", policy=key)["rps"]
            for name, label, service, key in steps
        }
        cost = 100 * (1 - rps["default"] / rps["pass_on_default"])
        rounds.append(
            {**{f"{k}_rps": round(v) for k, v in rps.items()}, "cost_pct": round(cost, 1)}
        )
        print(f"  round {index + 1}: {rps}, cost {cost:.1f} %", flush=True)
    median = statistics.median(r["cost_pct"] for r in rounds)
    return {"concurrency": sc, "rounds": rounds, "median_cost_pct": round(median, 1)}


def _find(rows: list[dict[str, Any]], label: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["label"] == label and r["concurrency"] == concurrency), None)


def phase_fixed_rate(bench: Bench, saturation: list[dict[str, Any]]) -> dict[str, Any]:
    """hey at half the pass-through guard's saturation rate: direct vs each guard setup."""
    o = bench.options
    reference = _find(saturation, "guard pass-through", o.sat_concurrency)
    assert reference is not None
    rate = round(reference["rps"] / 2)
    plan = [
        ("direct (fake upstream)", "direct", "pass"),
        ("guard pass-through", "g_pass", "pass"),
        ("guard default policy", "g_default", "default"),
        ("guard default + limits, memory", "g_limits", "limited"),
        ("guard default + limits, redis", "g_redis", "limited"),
    ]
    rows = []
    for label, name, key in plan:
        service = bench.services[name]
        watch = [service] if name == "direct" else [service, bench.services["direct"]]

        def run(service: Service = service, key: str = key) -> dict[str, Any]:
            return loadgen.hey(
                service.url + "/v1/chat/completions",
                body_file=bench.bodies["chat_fixed"],
                key=bench.key_for(service, key),
                rate=rate,
                duration_s=o.duration_s,
                concurrency=o.rate_concurrency,
                cpus=bench.layout.load,
            )

        row = bench.measured(watch, run)
        row.update(label=label, target=service.name)
        rows.append(row)
        print(
            f"  {label:<44} {row['achieved_rps']:7.0f}/{rate} req/s  p50 {row['p50_ms']:6.2f} "
            f"ms  p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}",
            flush=True,
        )
    direct = rows[0]
    for row in rows[1:]:
        row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
        row["added_p90_ms"] = row["p90_ms"] - direct["p90_ms"]
        row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]
    return {"rate_rps": rate, "reference": "half of guard pass-through saturation", "rows": rows}


def _targets_file(bench: Bench, name: str, specs: list[dict[str, Any]]) -> Path:
    path = bench.work / f"targets_{name}.json"
    path.write_text(json.dumps(specs))
    return path


def phase_latency(bench: Bench) -> dict[str, Any]:
    """Concurrency 1, targets interleaved request by request (same moments, same noise)."""
    bench.wait_litellm()
    plan = [
        ("direct (fake upstream)", "direct", "pass"),
        ("guard pass-through", "g_pass", "pass"),
        ("guard default policy", "g_default", "default"),
        ("guard default + limits, memory", "g_limits", "limited"),
        ("guard default + limits, redis", "g_redis", "limited"),
        ("guard pass-through, 2 workers", "g_2w", "pass"),
        ("guard default + limits, 2 workers (redis)", "g_2w", "limited"),
    ]
    if "litellm" in bench.services:
        plan.append(("LiteLLM proxy", "litellm", "pass"))
    specs = [
        {
            "name": label,
            "url": bench.services[name].url,
            "key": bench.key_for(bench.services[name], key),
            "body_file": str(bench.bodies["chat"]),
        }
        for label, name, key in plan
    ]
    n = bench.options.latency_requests
    data = loadgen.python_client(
        "paired",
        ["--targets", str(_targets_file(bench, "latency", specs)), "--requests", str(n),
         "--max-seconds", str(max(30.0, n * 0.1))],
        bench.layout.load,
        timeout_s=max(90.0, n * 0.2),
    )  # fmt: skip
    direct = data["latency_s"][plan[0][0]]
    rows = []
    for label, _, _ in plan:
        values = data["latency_s"][label]
        row: dict[str, Any] = {"label": label, **summary_ms(values)}
        if label != plan[0][0]:
            paired = [g - d for g, d in zip(values, direct, strict=False)]
            row["added_p50_ms"] = row["p50_ms"] - summary_ms(direct)["p50_ms"]
            row["paired_diff"] = summary_ms(paired)
        rows.append(row)
        print(f"  {label:<44} p50 {row['p50_ms']:6.3f} ms  p99 {row['p99_ms']:6.3f} ms", flush=True)
    return {"requests": n, "client": "python aiohttp, concurrency 1", "rows": rows}


def phase_stream_timing(bench: Bench) -> dict[str, Any]:
    """Time to first chunk and added time per chunk, concurrency 1, interleaved."""
    bench.wait_litellm()
    chunks = bench.options.stream_chunks
    plan = [
        ("direct (fake upstream)", "direct", "pass", "stream_long"),
        ("guard pass-through", "g_pass", "pass", "stream_long"),
        ("guard default policy", "g_default", "default", "stream_long"),
        ("direct + logprobs(5)", "direct", "pass", "stream_long_logprobs"),
        ("guard default + logprobs(5)", "g_default", "default_lp", "stream_long_logprobs"),
    ]
    if "litellm" in bench.services:
        plan.append(("LiteLLM proxy", "litellm", "pass", "stream_long"))
    specs = [
        {
            "name": label,
            "url": bench.services[name].url,
            "key": bench.key_for(bench.services[name], key),
            "body_file": str(bench.bodies[body]),
        }
        for label, name, key, body in plan
    ]
    n = bench.options.stream_requests
    data = loadgen.python_client(
        "stream",
        ["--targets", str(_targets_file(bench, "stream", specs)), "--requests", str(n),
         "--max-seconds", str(max(30.0, n * 0.3))],
        bench.layout.load,
        timeout_s=max(90.0, n * 0.5),
    )  # fmt: skip
    rows = []
    by_label: dict[str, dict[str, float]] = {}
    for label, _, _, body in plan:
        runs = data[label]
        after_first = [t - f for f, t in zip(runs["first_s"], runs["total_s"], strict=True)]
        row: dict[str, Any] = {
            "label": label,
            "body": body,
            "chunks_seen": max(runs["chunks"]) if runs["chunks"] else 0,
            "first_chunk": summary_ms(runs["first_s"]),
            "total": summary_ms(runs["total_s"]),
            "after_first": summary_ms(after_first),
        }
        base = "direct + logprobs(5)" if "logprobs" in body else "direct (fake upstream)"
        if label != base and base in by_label:
            ref = by_label[base]
            row["added_first_chunk_p50_ms"] = row["first_chunk"]["p50_ms"] - ref["first_p50"]
            row["added_per_chunk_p50_ms"] = (row["after_first"]["p50_ms"] - ref["after_p50"]) / max(
                1, chunks - 1
            )
            row["added_total_p50_ms"] = row["total"]["p50_ms"] - ref["total_p50"]
        by_label[label] = {
            "first_p50": row["first_chunk"]["p50_ms"],
            "after_p50": row["after_first"]["p50_ms"],
            "total_p50": row["total"]["p50_ms"],
        }
        rows.append(row)
        print(
            f"  {label:<44} first {row['first_chunk']['p50_ms']:6.3f} ms  total "
            f"{row['total']['p50_ms']:6.3f} ms"
            + (
                f"  +{row['added_per_chunk_p50_ms'] * 1000:.1f} us/chunk"
                if "added_per_chunk_p50_ms" in row
                else ""
            ),
            flush=True,
        )
    return {
        "requests": n,
        "chunks": chunks,
        "client": "python aiohttp, concurrency 1",
        "rows": rows,
    }


def _py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def record_profile(
    bench: Bench, pid: int, path: Path, fmt: str, load: Callable[[float], dict[str, Any]]
) -> dict[str, Any]:
    """py-spy (samples holding the GIL, so CPU time of Python code) on ``pid`` while
    ``load(seconds)`` runs; returns where it was written, the command and the load's result."""
    spy = _py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (scripts/install-bench-tools.sh)")
    duration = max(1, int(bench.options.duration_s))
    argv = [
        spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "250",
        "--gil", "--nolineno", "--format", fmt, "-o", str(path),
    ]  # fmt: skip
    spy_proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=procs.die_with_parent
    )
    try:
        time.sleep(0.3)
        result = load(duration + 1)
        output = spy_proc.communicate(timeout=duration + 60)[0].decode(errors="replace")
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if spy_proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"py-spy failed: {output[-800:]}")
    entry: dict[str, Any] = {f"{fmt}_file": str(path), f"{fmt}_command": " ".join(argv)}
    entry["load_rps"] = result["rps"]
    if fmt == "raw":
        entry["summary"] = summarize(path.read_text())
    print(f"  profile ({fmt}): {path}", flush=True)
    return entry


def phase_profile(bench: Bench) -> dict[str, Any]:
    """py-spy on 1-worker guards while wrk saturates them."""
    if _py_spy() is None:
        return {"skipped": "py-spy not installed (scripts/install-bench-tools.sh)"}
    o = bench.options
    profiles: dict[str, dict[str, Any]] = {}
    # (profile name, guard, client key, body, py-spy output format)
    plan = [
        ("pass", "g_pass", "pass", "chat", "raw"),
        ("default", "g_default", "default", "chat", "raw"),
        ("default_stream_logprobs", "g_default", "default_lp", "stream_logprobs", "raw"),
        ("limits_redis", "g_redis", "limited", "chat", "raw"),
    ]
    if o.quick:
        plan = plan[1:2]
    else:
        plan.append(("default", "g_default", "default", "chat", "flamegraph"))
    for name, guard, key, body, fmt in plan:
        service = bench.services[guard]
        suffix = "svg" if fmt == "flamegraph" else "txt"

        def load(
            seconds: float, service: Service = service, key: str = key, body: str = body
        ) -> dict[str, Any]:
            return loadgen.wrk(
                service.url,
                body_file=bench.bodies[body],
                key=KEYS[key],
                concurrency=o.sat_concurrency,
                duration_s=seconds,
                cpus=bench.layout.load,
            )

        entry = record_profile(
            bench, service.proc.pid, o.out / f"profile_{name}.{suffix}", fmt, load
        )
        profiles.setdefault(name, {"guard": service.name, "body": body, "key": key})
        profiles[name].update(entry)
    return profiles


def _scale_policy(work: Path, clients: int) -> Path:
    """A policy file with ``clients`` clients (only sha256 hashes) on one tier: the shipped
    default tier plus limits, so each client has a risk profile and a bucket."""
    default = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())["tiers"]["default"]
    tier = {**default, "limits": BIG_LIMITS}
    path = work / f"scale-policy-{clients}.yaml"
    import hashlib

    with open(path, "w") as f:
        f.write(yaml.safe_dump({"tiers": {"scaled": tier}}, sort_keys=False))
        f.write("clients:\n")
        for i in range(clients):
            digest = hashlib.sha256(f"sk-bench-{i:07d}".encode()).hexdigest()
            f.write(f'  c{i:07d}: {{tier: scaled, keys: ["sha256:{digest}"]}}\n')
    return path


def _wait_line(proc: procs.Proc, prefix: str, timeout_s: float, nth: int = 1) -> dict[str, Any]:
    """The JSON of the ``nth`` line of the process's log starting with ``prefix``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [x for x in proc.log_tail(200_000).splitlines() if x.startswith(prefix)]
        if len(found) >= nth:
            return json.loads(found[nth - 1].removeprefix(prefix))
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name}: no {prefix.strip()} within {timeout_s:.0f} s")


def phase_scale(bench: Bench) -> dict[str, Any]:
    """RSS, config load time and overhead against the number of configured, active clients."""
    o = bench.options
    up = bench.services["direct"]
    rows = []
    for clients in o.scale_clients:
        started = time.monotonic()
        policy = _scale_policy(bench.work, clients)
        config = bench.write_guard_config(f"scale-{clients}", up.url, [policy], {})
        port = procs.free_port()
        in_process = clients > o.http_populate_max
        argv = [
            sys.executable, "-m", "benchmarks.scale_guard", "--config", str(config),
            "--port", str(port), "--populate", str(clients if in_process else 0),
        ]  # fmt: skip
        proc = bench.start(
            procs.Proc(
                f"scale guard {clients}",
                argv,
                bench.log(f"scale_{clients}"),
                bench.layout.guard,
                {SECRET_ENV: SECRET},
            )
        )
        try:
            info = _wait_line(proc, "SCALE_JSON ", timeout_s=3600)
            url = f"http://127.0.0.1:{port}"
            service = Service(f"guard, {clients} clients", url, proc)
            populate: dict[str, Any] = {"method": "in-process (store.observe + admit + settle)"}
            if not in_process:
                populate = loadgen.python_client(
                    "populate",
                    ["--url", url + "/v1/chat/completions", "--body", str(bench.bodies["chat"]),
                     "--keys", str(clients), "--concurrency", "16", "--max-seconds", "900",
                     "--vary", str(10**9)],
                    bench.layout.load,
                    timeout_s=960,
                )  # fmt: skip
                populate["method"] = "HTTP, one request per client"
            os.kill(proc.pid, signal.SIGUSR1)
            memory = _wait_line(proc, "RSS_JSON ", timeout_s=120)
            specs = [
                {"name": "direct", "url": up.url, "body_file": str(bench.bodies["chat"])},
                {"name": "guard", "url": url, "rotate_keys": clients,
                 "body_file": str(bench.bodies["chat"])},
            ]  # fmt: skip
            n = max(50, o.latency_requests // 2)
            latency = loadgen.python_client(
                "paired",
                ["--targets", str(_targets_file(bench, f"scale{clients}", specs)),
                 "--requests", str(n), "--max-seconds", "120"],
                bench.layout.load,
                timeout_s=180,
            )["latency_s"]  # fmt: skip

            def run(url: str = url, clients: int = clients) -> dict[str, Any]:
                return loadgen.wrk(
                    url,
                    body_file=bench.bodies["chat"],
                    key=None,
                    rotate_keys=clients,
                    concurrency=o.sat_concurrency,
                    duration_s=o.duration_s,
                    cpus=bench.layout.load,
                )

            saturation = bench.measured([service, up], run)
            profile = None
            if o.profile and not o.quick and clients == max(o.scale_clients) and _py_spy():

                def load(seconds: float, url: str = url, clients: int = clients) -> dict[str, Any]:
                    return loadgen.wrk(
                        url,
                        body_file=bench.bodies["chat"],
                        key=None,
                        rotate_keys=clients,
                        concurrency=o.sat_concurrency,
                        duration_s=seconds,
                        cpus=bench.layout.load,
                    )

                path = o.out / f"profile_scale_{clients}.txt"
                profile = record_profile(bench, proc.pid, path, "raw", load)
            direct, guarded = summary_ms(latency["direct"]), summary_ms(latency["guard"])
            row = {
                "clients": clients,
                "policy_file_bytes": policy.stat().st_size,
                "config_load_s": info["config_load_s"],
                "startup_s": info["startup_s"],
                "populate": populate,
                "populate_in_process_s": info["populate_s"] if in_process else None,
                "rss_after_load_mb": info["rss_after_load"] / 2**20,
                "rss_peak_mb": memory["rss_peak"] / 2**20,
                "clients_deep_mb": info["clients_deep_bytes"] / 2**20,
                "store_deep_mb": memory["store_deep_bytes"] / 2**20,
                "profile": profile,
                "rss_populated_mb": memory["rss"] / 2**20,
                "latency_direct": direct,
                "latency_guard": guarded,
                "added_p50_ms": guarded["p50_ms"] - direct["p50_ms"],
                "added_p99_ms": guarded["p99_ms"] - direct["p99_ms"],
                "saturation": saturation,
                "wall_s": time.monotonic() - started,
            }
            rows.append(row)
            print(
                f"  {clients:>8} clients: load {row['config_load_s']:7.2f} s, RSS "
                f"{row['rss_populated_mb']:8.1f} MB, +{row['added_p50_ms']:.3f} ms p50, "
                f"{saturation['rps']:.0f} req/s",
                flush=True,
            )
        finally:
            bench.stop(proc)
            policy.unlink(missing_ok=True)
    base = rows[0] if rows else None
    for row in rows[1:]:
        extra = row["clients"] - base["clients"]
        row["config_bytes_per_client"] = (
            (row["rss_after_load_mb"] - base["rss_after_load_mb"]) * 2**20 / extra
        )
        row["total_bytes_per_client"] = (
            (row["rss_populated_mb"] - base["rss_populated_mb"]) * 2**20 / extra
        )
        row["state_bytes_per_client"] = (
            row["total_bytes_per_client"] - row["config_bytes_per_client"]
        )
        for name in ("clients_deep", "store_deep"):
            row[f"{name}_bytes_per_client"] = (
                (row[f"{name}_mb"] - base[f"{name}_mb"]) * 2**20 / extra
            )
    return {
        "tier": "policies/default.yaml `default` + limits (detection on)",
        "http_populate_max": o.http_populate_max,
        "rows": rows,
    }


def phase_vllm(bench: Bench) -> dict[str, Any]:
    """The guard in front of real vLLM (CPU) on the bundled teacher, when its weights exist."""
    from guard_server.teacher.task import completion_prompt, make_problems
    from guard_server.upstream.bundled_teacher import TEACHER_DIR
    from guard_server.upstream.vllm_process import VllmProcess

    model_dir = bench.options.vllm_model or TEACHER_DIR
    if not (model_dir / "config.json").exists():
        return {"skipped": f"no model at {model_dir} (config.json missing: not trained yet)"}
    o = bench.options
    vllm = VllmProcess(model_dir, "teacher", log_path=bench.log("vllm"))
    vllm.start()
    guard = None
    try:
        startup = vllm.wait_healthy(600)
        policies = [REPO / "policies" / "default.yaml", bench.write_policy()]
        config = bench.write_guard_config("guard-vllm", vllm.url, policies, {})
        port = procs.free_port()
        guard = bench.start(
            procs.guard(config, port, bench.log("guard_vllm"), None, 1, {SECRET_ENV: SECRET})
        )
        url = f"http://127.0.0.1:{port}"
        guard.wait_http(url + "/readyz", 60)
        prompt = completion_prompt(make_problems(1, 5, "heldout")[0].question)
        body = bench.work / "body_vllm.json"
        body.write_text(
            json.dumps({"model": "teacher", "prompt": prompt, "max_tokens": 16, "temperature": 0})
        )
        specs = [
            {"name": "direct vLLM", "url": vllm.url, "path": "/v1/completions",
             "body_file": str(body)},
            {"name": "guard pass-through", "url": url, "path": "/v1/completions",
             "key": KEYS["pass"], "body_file": str(body)},
            {"name": "guard default policy", "url": url, "path": "/v1/completions",
             "key": KEYS["default"], "body_file": str(body)},
        ]  # fmt: skip
        n = 20 if o.quick else 200
        data = loadgen.python_client(
            "paired",
            ["--targets", str(_targets_file(bench, "vllm", specs)), "--requests", str(n),
             "--warmup", "5", "--max-seconds", "600"],
            None,
            timeout_s=700,
        )["latency_s"]  # fmt: skip
        direct = summary_ms(data["direct vLLM"])
        rows = []
        for spec in specs:
            row = {"label": spec["name"], **summary_ms(data[spec["name"]])}
            if spec["name"] != "direct vLLM":
                row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
            rows.append(row)
        saturation = []
        for name, target, key in (("direct vLLM", vllm.url, None), ("guard", url, KEYS["pass"])):
            result = loadgen.wrk(
                target,
                body_file=body,
                key=key,
                path="/v1/completions",
                concurrency=8,
                duration_s=o.duration_s,
            )
            result["label"] = name
            saturation.append(result)
        return {
            "model_dir": str(model_dir),
            "vllm_startup_s": startup,
            "latency_c1": rows,
            "requests": n,
            "saturation_c8": saturation,
        }
    finally:
        if guard is not None:
            bench.stop(guard)
        vllm.stop()


# -------------------------------------------------------------------- targets, metadata


def evaluate_targets(results: dict[str, Any], options: Options) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    targets: list[dict[str, Any]] = []
    sat = results.get("saturation")
    sat = sat if isinstance(sat, list) else []
    sc = options.sat_concurrency

    def add(name: str, goal: str, value: float | None, met: bool | None, note: str) -> None:
        targets.append({"target": name, "goal": goal, "value": value, "met": met, "how": note})

    guard = _find(sat, "guard pass-through", sc)
    litellm = _find(sat, "LiteLLM proxy", sc)
    if guard and litellm:
        ratio = guard["rps"] / litellm["rps"]
        add("throughput vs LiteLLM", ">= 10x", round(ratio, 1), ratio >= 10,
            f"saturation req/s at c={sc}, 1 process each")  # fmt: skip
        if guard.get("rps_per_core") and litellm.get("rps_per_core"):
            ratio = guard["rps_per_core"] / litellm["rps_per_core"]
            note = f"req/s per core of the proxy process at c={sc} (robust to a busy machine)"
            add("throughput per CPU core vs LiteLLM", ">= 10x", round(ratio, 1), ratio >= 10, note)
    else:
        add("throughput vs LiteLLM", ">= 10x", None, None, "LiteLLM not run")
    fixed = results.get("fixed_rate") or {}
    row = next((r for r in fixed.get("rows", []) if r["label"] == "guard pass-through"), None)
    if row:
        add(
            "added latency p50 at half saturation",
            "<= 1 ms",
            round(row["added_p50_ms"], 3),
            row["added_p50_ms"] <= 1,
            f"hey at {fixed['rate_rps']} req/s, guard minus direct",
        )
        add(
            "added latency p99 at half saturation",
            "<= 5 ms",
            round(row["added_p99_ms"], 3),
            row["added_p99_ms"] <= 5,
            f"hey at {fixed['rate_rps']} req/s, guard minus direct",
        )
    stream = results.get("stream_timing") or {}
    for label in ("guard pass-through", "guard default policy"):
        row = next((r for r in stream.get("rows", []) if r["label"] == label), None)
        if row and "added_per_chunk_p50_ms" in row:
            value = row["added_per_chunk_p50_ms"]
            add(
                f"streaming, added per chunk ({label.removeprefix('guard ')})",
                "<= 0.2 ms",
                round(value, 4),
                value <= 0.2,
                f"c=1, {stream['chunks']} chunks, (total - first chunk) p50 difference / chunks",
            )
    default = _find(sat, "guard default policy", sc)
    policy_cost = results.get("policy_cost") or {}
    if "median_cost_pct" in policy_cost:
        value = policy_cost["median_cost_pct"]
        add(
            "default policy cost",
            "<= 15% of pass-through req/s",
            value,
            value <= 15,
            f"one guard process, pass-through vs default client saturated in turn, median of "
            f"{len(policy_cost['rounds'])} rounds, c={policy_cost['concurrency']}",
        )
    elif guard and default:
        ratio = default["rps"] / guard["rps"]
        add(
            "default policy cost",
            "<= 15% of pass-through req/s",
            round(100 * (1 - ratio), 1),
            ratio >= 0.85,
            f"saturation req/s at c={sc}",
        )
        if guard.get("rps_per_core") and default.get("rps_per_core"):
            ratio = default["rps_per_core"] / guard["rps_per_core"]
            add(
                "default policy cost per CPU core",
                "<= 15% of pass-through req/s per core",
                round(100 * (1 - ratio), 1),
                ratio >= 0.85,
                f"req/s per guard core at c={sc} (robust to a busy machine)",
            )
    latency = results.get("latency_c1") or {}
    mem = next((r for r in latency.get("rows", []) if r["label"].endswith("limits, memory")), None)
    red = next((r for r in latency.get("rows", []) if r["label"].endswith("limits, redis")), None)
    if mem and red:
        value = red["p50_ms"] - mem["p50_ms"]
        add("Redis backend, added p50", "<= 1 ms", round(value, 3), value <= 1,
            "c=1 p50, redis minus memory store (limits + detection on both)")  # fmt: skip
    return targets


def _version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, memory and software versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import psutil

    litellm = "not installed"
    if (BENCH_VENV / "bin" / "python").exists():
        litellm = _tool_version(
            [str(BENCH_VENV / "bin" / "python"), "-c",
             "import importlib.metadata as m; print(m.version('litellm'))"]
        )  # fmt: skip
    commit = _tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "pydantic": _version("pydantic"),
        "prometheus_client": _version("prometheus-client"),
        "redis_py": _version("redis"),
        "litellm": litellm,
        "wrk": " ".join(_tool_version(["wrk", "--version"]).split()[:2]),
        "hey": "hey (no version flag)" if shutil.which("hey") else "not installed",
        "redis_server": " ".join(_tool_version(["redis-server", "--version"]).split()[:3]),
        "py_spy": _tool_version([_py_spy() or "py-spy", "--version"]),
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


def _options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: ~1 s per load step")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--duration", type=float, help="seconds per load step (default 10)")
    parser.add_argument("--scale-clients", help="comma-separated (default 1,10000,1000000)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--vllm-model", type=Path, help="model folder (default: bundled teacher)")
    parser.add_argument("--only", help=f"comma-separated phases to run, of: {', '.join(PHASES)}")
    args = parser.parse_args(argv)
    quick = args.quick
    scale = args.scale_clients or ("1,300" if quick else "1,10000,1000000")
    only = set(args.only.split(",")) if args.only else set(PHASES)
    if only - set(PHASES):
        parser.error(f"unknown phase(s): {', '.join(sorted(only - set(PHASES)))}")
    return Options(
        quick=quick,
        out=args.out,
        duration_s=args.duration or (1.0 if quick else 10.0),
        concurrencies=[16] if quick else [8, 16, 32],
        sat_concurrency=16,
        latency_requests=30 if quick else 1000,
        stream_requests=15 if quick else 300,
        stream_chunks=64,
        scale_clients=[int(x) for x in scale.split(",") if x.strip()],
        http_populate_max=10_000,
        litellm=not args.no_litellm and (BENCH_VENV / "bin" / "litellm").exists(),
        vllm=not args.no_vllm and "e2e_vllm" in only and (not quick or args.only is not None),
        profile=not args.no_profile,
        pin=not args.no_pin,
        vllm_model=args.vllm_model,
        only=only - ({"profile"} if args.no_profile else set()),
    )


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the phases, write ``results.json`` and ``results.md``; return an exit status."""
    options = _options(argv)
    missing = [tool for tool in ("wrk", "hey", "redis-server") if not shutil.which(tool)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (scripts/install-bench-tools.sh)")
        return 2
    options.out.mkdir(parents=True, exist_ok=True)
    layout = Layout.make(options.pin)
    work = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    bench = Bench(options, layout, work)
    args = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.run", *args])
    results = bench.results
    results["meta"] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "quick": options.quick,
        "duration_s_per_step": options.duration_s,
        "layout": layout.describe(),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
        "workdir": str(work),
    }
    print(f"guard benchmarks ({'quick' if options.quick else 'full'}); logs in {work}", flush=True)
    started = time.monotonic()
    busy = procs.system_busy_seconds()
    own = procs.own_cpu_seconds()
    errors: dict[str, str] = {}

    skipped = {} if options.profile else {"profile": "--no-profile"}
    phase_seconds: dict[str, float] = {}
    results["meta"]["phase_seconds"] = phase_seconds

    def phase(name: str, run: Callable[[], Any]) -> None:
        if name not in options.only and name != "services":
            results[name] = {"skipped": skipped.get(name, "not in --only")}
            return
        print(f"[{name}]", flush=True)
        begun = time.monotonic()
        try:
            results[name] = run()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            results[name] = {"error": errors[name]}
            traceback.print_exc()
        finally:
            phase_seconds[name] = round(time.monotonic() - begun, 1)

    try:
        with _terminate_on_signals():
            bench.write_bodies()
            bench.write_policy()
            if options.only & set(SERVICE_PHASES):
                phase("services", lambda: bench.start_services() or list(bench.services))
            elif options.only & {"upstream_capacity", "scale"}:
                phase("services", lambda: bench.start_upstream_only() or list(bench.services))
            if "services" in results and "services" not in errors:
                phase("upstream_capacity", lambda: phase_upstream_capacity(bench))
                phase("saturation", lambda: phase_saturation(bench))
                phase("policy_cost", lambda: phase_policy_cost(bench))
                if isinstance(results.get("saturation"), list):
                    phase("fixed_rate", lambda: phase_fixed_rate(bench, results["saturation"]))
                else:
                    results["fixed_rate"] = {"skipped": "needs the saturation phase"}
                phase("latency_c1", lambda: phase_latency(bench))
                phase("stream_timing", lambda: phase_stream_timing(bench))
                phase("profile", lambda: phase_profile(bench))
                phase("guard_metrics", lambda: _guard_metrics(bench))
                phase("scale", lambda: phase_scale(bench))
            if options.vllm:
                phase("e2e_vllm", lambda: phase_vllm(bench))
            else:
                results["e2e_vllm"] = {"skipped": "--quick, --no-vllm or not in --only"}
            if not options.litellm:
                results["litellm"] = {"skipped": "no .bench-venv or --no-litellm"}
    except KeyboardInterrupt:
        errors["interrupted"] = "interrupted"
    finally:
        bench.stop_all()
    wall = time.monotonic() - started
    other = (procs.system_busy_seconds() - busy) - (procs.own_cpu_seconds() - own)
    results["meta"].update(
        wall_s=round(wall, 1),
        loadavg_end=os.getloadavg(),
        other_load_cores=round(max(0.0, other) / wall, 2),
        busy=max(0.0, other) / wall > 0.15,
        errors=errors,
    )
    try:
        results["targets"] = evaluate_targets(results, options)
    except Exception as exc:  # never lose the measurements over the summary
        results["targets"] = []
        errors["targets"] = f"{type(exc).__name__}: {exc}"
    json_path = options.out / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    md_path = options.out / "results.md"
    md_path.write_text(render_markdown(results))
    print(f"wrote {md_path} and {json_path} in {wall:.0f} s", flush=True)
    if errors:
        print(f"errors in {', '.join(errors)}; logs kept in {work}", flush=True)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _guard_metrics(bench: Bench) -> dict[str, Any]:
    """What each guard counted: statuses and the detection actions it took."""
    out = {}
    for name, service in bench.services.items():
        if not name.startswith("g_"):
            continue
        with urllib.request.urlopen(service.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(("guard_requests_total{", "guard_actions_total{")):
                series, _, value = line.rpartition(" ")
                counts[series] = counts.get(series, 0.0) + float(value)
        out[service.name] = counts
    return out


if __name__ == "__main__":
    sys.exit(main())
