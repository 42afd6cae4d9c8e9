"""The state of one run: its child processes, request bodies, policies, the services under
test, and how a load step is measured (CPU of each process, rest of the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import loadgen, procs
from benchmarks.run.options import BENCH_VENV, Layout, Options
from guard_server.pipeline.auth import hash_key
from guard_server.testing import (
    DEFAULT_POLICY,
    ChildProcess,
    GuardProcess,
    RedisProcess,
    free_port,
    write_config,
)

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


@dataclass
class Service:
    """A running server under test."""

    name: str
    url: str
    proc: ChildProcess
    workers: int = 1
    backend: str = ""


@dataclass
class Bench:
    """The state of one benchmark run."""

    options: Options
    layout: Layout
    work: Path
    running: list[ChildProcess] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    bodies: dict[str, Path] = field(default_factory=dict)

    # ---------------------------------------------------------------- processes

    def start(self, proc: ChildProcess) -> ChildProcess:
        self.running.append(proc.spawn())
        return proc

    def stop(self, proc: ChildProcess) -> None:
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

    def write_targets(self, name: str, specs: list[dict[str, Any]]) -> Path:
        """The targets file of the Python client (``benchmarks.client``)."""
        path = self.work / f"targets_{name}.json"
        path.write_text(json.dumps(specs))
        return path

    def write_service_targets(self, name: str, plan: list[tuple[str, str, str, str]]) -> Path:
        """:meth:`write_targets` for ``plan``: (label, service, client key, body) each."""
        specs = [
            {
                "name": label,
                "url": self.services[service].url,
                "key": self.key_for(self.services[service], key),
                "body_file": str(self.bodies[body]),
            }
            for label, service, key, body in plan
        ]
        return self.write_targets(name, specs)

    def write_guard_config(
        self, name: str, upstream: str, policies: list[Path], state: dict[str, Any]
    ) -> Path:
        return write_config(
            self.work,
            [upstream],
            policies=policies,
            name=f"{name}.yaml",
            secret={"env": SECRET_ENV},
            state=state,
        )

    def guard(
        self, config: Path, log_path: Path, cpus: set[int] | None, workers: int
    ) -> GuardProcess:
        """``guard-server serve`` as an operator runs it, with the benchmark's secret."""
        return GuardProcess(
            config,
            log_path,
            workers=workers,
            log_level="WARNING",
            env={SECRET_ENV: SECRET},
            cpus=cpus,
            name=f"guard ({workers} worker(s))",
        )

    # ---------------------------------------------------------------- services

    def start_services(self) -> None:
        layout = self.layout
        upstream_port = free_port()
        upstream = self.start(
            procs.fake_upstream(upstream_port, self.log("fake_upstream"), layout.load)
        )
        up_url = f"http://127.0.0.1:{upstream_port}"
        self.services["direct"] = Service("fake upstream (direct)", up_url, upstream)
        redis = RedisProcess(log_path=self.log("redis"), cpus=layout.load)
        self.start(redis)
        self.services["redis"] = Service("redis", f"redis://127.0.0.1:{redis.port}", redis)
        policies = [DEFAULT_POLICY, self.write_policy()]
        prefix = f"bench{os.getpid()}"
        # One process per setup, so that no setup runs warm on another's requests.
        guards = {
            "g_pass": ("memory", 1),
            "g_default": ("memory", 1),
            "g_limits": ("memory", 1),
            "g_redis": ("redis", 1),
            "g_2w": ("redis", 2),
        }
        for name, (backend, workers) in guards.items():
            state = {}
            if backend == "redis":
                state = {"backend": "redis", "redis_url": redis.url, "key_prefix": prefix + name}
            config = self.write_guard_config(name, up_url, policies, state)
            cpus = layout.guard if workers == 1 else layout.every
            proc = self.start(self.guard(config, self.log(name), cpus, workers))
            self.services[name] = Service(
                f"guard {name.removeprefix('g_')} ({workers}w {backend})",
                proc.url,
                proc,
                workers,
                backend,
            )
        if self.options.litellm:
            self.services["litellm"] = self.start_litellm(up_url)
            self.results["litellm_started_at"] = time.monotonic()
        upstream.wait_http(up_url + "/health", 30)
        redis.wait_up()
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
        port = free_port()
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
        port = free_port()
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
        proc = ChildProcess(
            "litellm", argv, self.log("litellm"), env=env, cwd=self.work, cpus=self.layout.guard
        )
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
        before = [procs.cpu_seconds(s.proc) for s in watch]
        own = procs.own_cpu_seconds()
        busy = procs.system_busy_seconds()
        started = time.monotonic()
        row = run()
        wall = time.monotonic() - started
        used = [procs.cpu_seconds(s.proc) - b for s, b in zip(watch, before, strict=True)]
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


def guard_metrics(bench: Bench) -> dict[str, Any]:
    """What each guard counted: statuses and the detection actions it took."""
    out = {}
    for name, service in bench.services.items():
        if not name.startswith("g_"):
            continue
        assert isinstance(service.proc, GuardProcess)
        text = service.proc.metrics()  # on the guard's own metrics port
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(("guard_requests_total{", "guard_actions_total{")):
                series, _, value = line.rpartition(" ")
                counts[series] = counts.get(series, 0.0) + float(value)
        out[service.name] = counts
    return out
