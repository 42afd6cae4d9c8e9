"""Before vs after in one run: this checkout's guard against another checkout's, same load.

    git worktree add /tmp/before cfb0f7e
    .venv/bin/python -m benchmarks.before_after --before /tmp/before --rounds 6

One fake upstream, two 1-worker guards pinned to the same CPU (the other checkout's code with
its own shipped tiers, and this checkout's), the same policy file and clients as
``benchmarks.run``. Each round saturates both guards with wrk, the pass-through client and
the default-tier client, in an order that alternates from round to round, so that the
machine's drift falls on both sides alike. The report gives each round's req/s and the
medians of the after/before ratios, of req/s and of requests per CPU-second of the guard
process (steadier when other work shares the machine): a change on the request path is
measured as a ratio in one run, not as two runs on different days.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.run.bench import SECRET, SECRET_ENV, Bench, Service
from benchmarks.run.options import Layout, parse_options
from guard_server.testing import DEFAULT_POLICY, GuardProcess
from load_tests.checkout import Checkout

CLIENTS = ("pass", "default")


def start_guards(bench: Bench, before: Checkout) -> None:
    """The two guards, each with its checkout's shipped tiers and the benchmark's clients."""
    upstream = bench.services["direct"].url
    bench_policy = bench.write_policy()
    for side, checkout in (("before", before), ("after", None)):
        shipped = DEFAULT_POLICY if checkout is None else checkout.policy
        config = bench.write_guard_config(f"g_{side}", upstream, [shipped, bench_policy], {})
        env = {SECRET_ENV: SECRET}
        if checkout is not None:
            os.environ.setdefault(SECRET_ENV, SECRET)  # its check-config resolves the secret
            checkout.adapt(config)
            env.update(checkout.env)
        proc = GuardProcess(
            config,
            bench.log(f"g_{side}"),
            workers=1,
            log_level="WARNING",
            env=env,
            cpus=bench.layout.guard,
            name=f"guard ({side})",
            cwd=None if checkout is None else checkout.root,
        )
        bench.start(proc)
        proc.wait_http(proc.url + "/readyz", 60)
        service = Service(f"guard {side}", proc.url, proc, 1, "memory")
        bench.services[f"g_{side}"] = service
        bench.warm(service)


def run_rounds(bench: Bench, rounds: int) -> list[dict[str, Any]]:
    """``rounds`` rounds of the four steps; the order of the sides alternates."""
    out = []
    for index in range(rounds):
        sides = ("before", "after") if index % 2 == 0 else ("after", "before")
        row: dict[str, Any] = {"order": list(sides)}
        for client in CLIENTS:
            for side in sides:
                step = bench.saturate(
                    f"{side} {client}",
                    f"g_{side}",
                    client,
                    "chat",
                    bench.options.sat_concurrency,
                    group="before_after",
                    policy=client,
                )
                row[f"{side}_{client}_rps"] = round(step["rps"])
                row[f"{side}_{client}_per_core"] = round(step["rps_per_core"] or 0)
                row[f"{side}_{client}_errors"] = step["errors"]
        for client in CLIENTS:
            for measure, name in (("rps", "ratio"), ("per_core", "per_core_ratio")):
                after, before = row[f"after_{client}_{measure}"], row[f"before_{client}_{measure}"]
                row[f"{client}_{name}"] = round(after / before, 3) if before else None
        for side in ("before", "after"):
            cost = 1 - row[f"{side}_default_rps"] / row[f"{side}_pass_rps"]
            row[f"{side}_cost_pct"] = round(100 * cost, 1)
        print(f"round {index + 1}: {json.dumps(row)}", flush=True)
        out.append(row)
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds, with their range."""
    summary: dict[str, Any] = {}
    names = ("pass_ratio", "default_ratio", "pass_per_core_ratio", "default_per_core_ratio")
    for name in (*names, "before_cost_pct", "after_cost_pct"):
        values = [r[name] for r in rounds]
        median = round(statistics.median(values), 3)
        summary[name] = {"median": median, "min": min(values), "max": max(values)}
    return summary


def markdown(before: Path, after_label: str, rounds: list[dict[str, Any]], summary: dict) -> str:
    """The report as a Markdown table."""
    lines = [
        f"before: `{before}`, after: {after_label}",
        "",
        "| round | before pass | after pass | before default | after default "
        "| pass after/before | default after/before | per CPU-second: pass | default |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, r in enumerate(rounds, 1):
        lines.append(
            f"| {index} | {r['before_pass_rps']} | {r['after_pass_rps']} | "
            f"{r['before_default_rps']} | {r['after_default_rps']} | "
            f"{r['pass_ratio']:.3f} | {r['default_ratio']:.3f} | "
            f"{r['pass_per_core_ratio']} | {r['default_per_core_ratio']} |"
        )
    lines.append("")
    for name, s in summary.items():
        lines.append(f"- {name}: median {s['median']} (range {s['min']} to {s['max']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load step")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out", type=Path, help="write the JSON and Markdown report here")
    args = parser.parse_args(argv)
    run_argv = ["--no-litellm", "--no-vllm", "--no-profile", "--duration", str(args.duration)]
    options = parse_options(run_argv + (["--no-pin"] if args.no_pin else []))
    with tempfile.TemporaryDirectory(prefix="guard-before-after-") as work:
        bench = Bench(options, Layout.make(options.pin), Path(work))
        try:
            bench.write_bodies()
            bench.start_upstream_only()
            start_guards(bench, Checkout(args.before.resolve()))
            rounds = run_rounds(bench, args.rounds)
        finally:
            bench.stop_all()
    summary = summarize(rounds)
    report = markdown(args.before, "this checkout", rounds, summary)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        data = {"before": str(args.before), "rounds": rounds, "summary": summary}
        (args.out / "before_after.json").write_text(json.dumps(data, indent=2))
        (args.out / "before_after.md").write_text(report)


if __name__ == "__main__":
    main()
