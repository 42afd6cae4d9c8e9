"""Load generators in their own processes (wrk, hey, the Python client) and percentiles."""

# wrk for saturation, hey for fixed rates, benchmarks.client for paired latency, stream
# timing and populating clients.

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guard_server.testing import REPO, child_setup

LUA = Path(__file__).resolve().parent / "lua" / "post.lua"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean of latencies given in seconds, in milliseconds."""
    if not seconds:
        return {"n": 0}
    return {
        "n": len(seconds),
        "p50_ms": percentile(seconds, 0.5) * 1000,
        "p90_ms": percentile(seconds, 0.9) * 1000,
        "p99_ms": percentile(seconds, 0.99) * 1000,
        "mean_ms": sum(seconds) / len(seconds) * 1000,
    }


def wrk(
    base_url: str,
    *,
    body_file: Path,
    key: str | None,
    concurrency: int,
    duration_s: float,
    path: str = "/v1/chat/completions",
    threads: int = 1,
    rotate_keys: int = 0,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """Saturate ``base_url`` with ``concurrency`` keep-alive connections for ``duration_s``."""
    env = {**os.environ, "BENCH_PATH": path, "BENCH_BODY": str(body_file)}
    if key:
        env["BENCH_KEY"] = key
    if rotate_keys:
        env["BENCH_KEYS"] = str(rotate_keys)
    argv = [
        "wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration_s:g}s",
        "--timeout", "10s", "-s", str(LUA), base_url,
    ]  # fmt: skip
    out = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        preexec_fn=child_setup(cpus),
        check=False,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    lat = data["latency_us"]
    seconds = data["duration_us"] / 1e6
    errors = data["errors"]
    return {
        "tool": "wrk",
        "concurrency": concurrency,
        "duration_s": round(seconds, 3),
        "requests": data["requests"],
        "rps": data["requests"] / seconds,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "mean_ms": lat["mean"] / 1000,
        "max_ms": lat["max"] / 1000,
        "errors": sum(errors.values()),
        "error_kinds": {k: v for k, v in errors.items() if v},
        "command": " ".join(argv),
    }


def hey(
    url: str,
    *,
    body_file: Path,
    key: str | None,
    rate: float,
    duration_s: float,
    concurrency: int = 8,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """Send ``rate`` requests/s (``concurrency`` workers, each at rate/concurrency) for about
    ``duration_s``; latencies from hey's per-request CSV."""
    count = max(1, int(rate * duration_s) // concurrency) * concurrency  # hey: n / c each
    per_worker = rate / concurrency
    argv = [
        "hey", "-n", str(count), "-c", str(concurrency), "-q", f"{per_worker:.3f}",
        "-m", "POST", "-T", "application/json", "-D", str(body_file), "-t", "10", "-o", "csv",
    ]  # fmt: skip
    if key:
        argv += ["-H", f"Authorization: Bearer {key}"]
    argv.append(url)
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration_s * 3 + 60,
        preexec_fn=child_setup(cpus),
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    latencies = [float(r["response-time"]) for r in rows]
    offsets = [float(r["offset"]) for r in rows]
    bad = sum(1 for r in rows if r["status-code"] != "200")
    span = max(offsets) if offsets else 0.0
    return {
        "tool": "hey",
        "target_rps": rate,
        "concurrency": concurrency,
        "requests": len(rows),
        "achieved_rps": (len(rows) - 1) / span if span > 0 else math.nan,
        "errors": bad + (count - len(rows)),
        **summary_ms(latencies),
        "command": " ".join(a if " " not in a else repr(a) for a in argv),
    }


def python_client(
    mode: str, args: Sequence[str], cpus: set[int] | None, timeout_s: float
) -> dict[str, Any]:
    """Run ``benchmarks.client <mode> <args>`` and return its JSON."""
    argv = [sys.executable, "-m", "benchmarks.client", mode, *args]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
        preexec_fn=child_setup(cpus),
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"client {mode} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
