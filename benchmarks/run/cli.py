"""``python -m benchmarks.run``: run the phases, write ``results.json`` and ``results.md``."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.report import render_markdown
from benchmarks.run.bench import Bench, guard_metrics
from benchmarks.run.e2e_vllm import phase_vllm
from benchmarks.run.latency import phase_latency, phase_stream_timing
from benchmarks.run.machine import machine_info
from benchmarks.run.options import SERVICE_PHASES, Layout, parse_options
from benchmarks.run.profiling import phase_profile
from benchmarks.run.scale import phase_scale
from benchmarks.run.targets import evaluate_targets
from benchmarks.run.throughput import (
    phase_fixed_rate,
    phase_policy_cost,
    phase_saturation,
    phase_upstream_capacity,
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
    options = parse_options(argv)
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
                phase("guard_metrics", lambda: guard_metrics(bench))
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
