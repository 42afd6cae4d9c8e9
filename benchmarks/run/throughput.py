"""Throughput phases: the fake upstream's capacity, saturation of every setup (wrk), the
default policy's cost, and latency at a fixed rate (hey)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import loadgen, procs
from benchmarks.run.bench import Bench, Service
from benchmarks.run.options import cpus_text
from guard_server.testing import (
    free_port,
)


def phase_upstream_capacity(bench: Bench) -> dict[str, Any]:
    """The fake upstream alone on the guard's CPU, loaded by wrk from the load CPUs."""
    port = free_port()
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
    return {"cpus": cpus_text(bench.layout.guard) or "any", "rows": rows}


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
    if o.rows:
        plan = [row for row in plan if any(part in row[0] for part in o.rows)]
    rows = []
    for label, service, key, body, concurrencies, group, policy in plan:
        for concurrency in concurrencies:
            rows.append(
                bench.saturate(label, service, key, body, concurrency, group=group, policy=policy)
            )
    return rows


POLICY_COST_ROUNDS = 9


def phase_policy_cost(bench: Bench) -> dict[str, Any]:
    """The default policy's cost: one guard process serving a pass-through client and a
    default-tier client in turn (wrk at saturation), several rounds whose order alternates,
    median and range of the rounds' costs. The same process serves both, so the cost is the
    policy's alone. Each is measured both in req/s and in requests per CPU-second of the
    guard (steadier when other work shares the machine). The pass-through guard process
    (``g_pass``) is measured in the same rounds for reference."""
    sc = bench.options.sat_concurrency
    steps = (
        ("pass", "guard pass-through", "g_pass", "pass"),
        ("pass_on_default", "guard default process, pass-through client", "g_default", "pass"),
        ("default", "guard default policy", "g_default", "default"),
    )
    rounds = []
    for index in range(POLICY_COST_ROUNDS):
        rows = {}
        for name, label, service, key in steps if index % 2 == 0 else steps[::-1]:
            rows[name] = bench.saturate(label, service, key, "chat", sc, group="policy", policy=key)
        rps = {name: row["rps"] for name, row in rows.items()}
        per_core = {name: row["rps_per_core"] or 0.0 for name, row in rows.items()}
        cost = 100 * (1 - rps["default"] / rps["pass_on_default"])
        base = per_core["pass_on_default"]
        cost_cpu = 100 * (1 - per_core["default"] / base) if base else float("nan")
        rounds.append(
            {
                **{f"{k}_rps": round(v) for k, v in rps.items()},
                **{f"{k}_per_core": round(v) for k, v in per_core.items()},
                "cost_pct": round(cost, 1),
                "cost_cpu_pct": round(cost_cpu, 1),
            }
        )
        print(f"  round {index + 1}: cost {cost:.1f} % (per CPU-second {cost_cpu:.1f} %)")
    out: dict[str, Any] = {"concurrency": sc, "rounds": rounds}
    for key in ("cost_pct", "cost_cpu_pct"):
        values = [r[key] for r in rounds]
        out[f"median_{key}"] = round(statistics.median(values), 1)
        out[f"range_{key}"] = [min(values), max(values)]
    return out


def find_row(rows: list[dict[str, Any]], label: str, concurrency: int) -> dict[str, Any] | None:
    """The saturation row of ``label`` at ``concurrency``, if measured."""
    return next((r for r in rows if r["label"] == label and r["concurrency"] == concurrency), None)


def phase_fixed_rate(bench: Bench, saturation: list[dict[str, Any]]) -> dict[str, Any]:
    """hey at half the pass-through guard's saturation rate: direct vs each guard setup."""
    o = bench.options
    reference = find_row(saturation, "guard pass-through", o.sat_concurrency)
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
