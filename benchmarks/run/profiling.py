"""The py-spy profiles of 1-worker guards under load."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.profile_summary import summarize
from benchmarks.run.bench import KEYS, Bench, Service
from guard_server.testing import (
    child_setup,
)


def py_spy_path() -> str | None:
    """The py-spy executable (next to this Python, else on PATH), if installed."""
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def record_profile(
    bench: Bench, pid: int, path: Path, fmt: str, load: Callable[[float], dict[str, Any]]
) -> dict[str, Any]:
    """py-spy (samples holding the GIL, so CPU time of Python code) on ``pid`` while
    ``load(seconds)`` runs; returns where it was written, the command and the load's result."""
    spy = py_spy_path()
    if spy is None:
        raise RuntimeError("py-spy is not installed (scripts/install-bench-tools.sh)")
    duration = max(1, int(bench.options.duration_s))
    argv = [
        spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "250",
        "--gil", "--nolineno", "--format", fmt, "-o", str(path),
    ]  # fmt: skip
    spy_proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=child_setup()
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
    if py_spy_path() is None:
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
