"""What a benchmark run measures: its phases, its options (the command line), the CPU layout."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from guard_server.testing import (
    REPO,
)

DEFAULT_OUT = REPO / "benchmarks" / "results"
BENCH_VENV = REPO / ".bench-venv"
DESCRIPTION = "Run every guard benchmark in one go; write a Markdown report and a JSON file."

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
    rows: list[str] = field(default_factory=list)


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
            f"1-worker guard and LiteLLM on CPU {cpus_text(self.guard)}; fake upstream, redis and "
            f"load generators on CPU {cpus_text(self.load)}; the 2-worker guard on CPUs "
            f"{cpus_text(self.every)}"
        )


def cpus_text(cpus: set[int] | None) -> str:
    """``cpus`` as a comma-separated list."""
    return ",".join(str(c) for c in sorted(cpus or ()))


def parse_options(argv: list[str] | None) -> Options:
    """The options of ``python -m benchmarks.run`` (``argv``: its arguments)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=DESCRIPTION)
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
    parser.add_argument(
        "--rows",
        help="comma-separated: run only the saturation rows whose label contains one of these "
        "(e.g. 'limits' for memory vs Redis vs 2 workers in one run)",
    )
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
        rows=[r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else [],
    )
