"""Memory, config load time and overhead against the number of configured, active clients."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import loadgen
from benchmarks.loadgen import summary_ms
from benchmarks.run.bench import BIG_LIMITS, SECRET, SECRET_ENV, Bench, Service
from benchmarks.run.profiling import py_spy_path, record_profile
from guard_server.testing import (
    DEFAULT_POLICY,
    ChildProcess,
    free_port,
)


def _scale_policy(work: Path, clients: int) -> Path:
    """A policy file with ``clients`` clients (only sha256 hashes) on one tier: the shipped
    default tier plus limits, so each client has a risk profile and a bucket."""
    default = yaml.safe_load(DEFAULT_POLICY.read_text())["tiers"]["default"]
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


def _wait_line(proc: ChildProcess, prefix: str, timeout_s: float, nth: int = 1) -> dict[str, Any]:
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
        port = free_port()
        in_process = clients > o.http_populate_max
        argv = [
            sys.executable, "-m", "benchmarks.scale_guard", "--config", str(config),
            "--port", str(port), "--populate", str(clients if in_process else 0),
        ]  # fmt: skip
        proc = bench.start(
            ChildProcess(
                f"scale guard {clients}",
                argv,
                bench.log(f"scale_{clients}"),
                env={SECRET_ENV: SECRET},
                cpus=bench.layout.guard,
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
                ["--targets", str(bench.write_targets(f"scale{clients}", specs)),
                 "--requests", str(n), "--max-seconds", "120"],
                bench.layout.load,
                timeout_s=180,
            )["latency_s"]  # fmt: skip

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

            saturation = bench.measured([service, up], functools.partial(load, o.duration_s))
            profile = None
            if o.profile and not o.quick and clients == max(o.scale_clients) and py_spy_path():
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
