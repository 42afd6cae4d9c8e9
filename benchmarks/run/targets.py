"""The performance targets, each with its measured value and whether it was met."""

from __future__ import annotations

from typing import Any

from benchmarks.run.options import Options
from benchmarks.run.throughput import find_row


def evaluate_targets(results: dict[str, Any], options: Options) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    targets: list[dict[str, Any]] = []
    sat = results.get("saturation")
    sat = sat if isinstance(sat, list) else []
    sc = options.sat_concurrency

    def add(name: str, goal: str, value: float | None, met: bool | None, note: str) -> None:
        targets.append({"target": name, "goal": goal, "value": value, "met": met, "how": note})

    guard = find_row(sat, "guard pass-through", sc)
    litellm = find_row(sat, "LiteLLM proxy", sc)
    if guard and litellm:
        ratio = guard["rps"] / litellm["rps"]
        add("throughput vs LiteLLM", ">= 50x", round(ratio, 1), ratio >= 50,
            f"saturation req/s at c={sc}, 1 process each")  # fmt: skip
        if guard.get("rps_per_core") and litellm.get("rps_per_core"):
            ratio = guard["rps_per_core"] / litellm["rps_per_core"]
            note = f"req/s per core of the proxy process at c={sc} (robust to a busy machine)"
            add("throughput per CPU core vs LiteLLM", ">= 50x", round(ratio, 1), ratio >= 50, note)
    else:
        add("throughput vs LiteLLM", ">= 50x", None, None, "LiteLLM not run")
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
    default = find_row(sat, "guard default policy", sc)
    policy_cost = results.get("policy_cost") or {}
    if "median_cost_pct" in policy_cost:
        value = policy_cost["median_cost_pct"]
        add(
            "default policy cost",
            "<= 10% of pass-through req/s",
            value,
            value <= 10,
            f"one guard process, pass-through vs default client saturated in turn, median of "
            f"{len(policy_cost['rounds'])} rounds (range {policy_cost.get('range_cost_pct')}; "
            f"per CPU-second {policy_cost.get('median_cost_cpu_pct')} %), "
            f"c={policy_cost['concurrency']}",
        )
    elif guard and default:
        ratio = default["rps"] / guard["rps"]
        add(
            "default policy cost",
            "<= 10% of pass-through req/s",
            round(100 * (1 - ratio), 1),
            ratio >= 0.90,
            f"saturation req/s at c={sc}",
        )
        if guard.get("rps_per_core") and default.get("rps_per_core"):
            ratio = default["rps_per_core"] / guard["rps_per_core"]
            add(
                "default policy cost per CPU core",
                "<= 10% of pass-through req/s per core",
                round(100 * (1 - ratio), 1),
                ratio >= 0.90,
                f"req/s per guard core at c={sc} (robust to a busy machine)",
            )
    latency = results.get("latency_c1") or {}
    mem = next((r for r in latency.get("rows", []) if r["label"].endswith("limits, memory")), None)
    red = next((r for r in latency.get("rows", []) if r["label"].endswith("limits, redis")), None)
    if mem and red:
        value = red["p50_ms"] - mem["p50_ms"]
        add("Redis backend, added p50", "<= 1 ms", round(value, 3), value <= 1,
            "c=1 p50, redis minus memory store (limits + detection on both)")  # fmt: skip
    _ratio_targets(sat, sc, add)
    return targets


# (target, numerator row, denominator row, goal): issue 21's ratios of two saturation rows
_RATIOS = (
    ("Redis mode vs memory mode", "guard default + limits, redis",
     "guard default + limits, memory", 0.8),
    ("2 workers vs 1 worker (Redis)", "guard default + limits, 2 workers (redis)",
     "guard default + limits, redis", 1.5),
    ("default + logprobs(5) vs pass-through + logprobs(5)", "guard default + logprobs(5)",
     "guard pass-through + logprobs(5)", 0.8),
)  # fmt: skip


def _ratio_targets(sat: list[dict[str, Any]], sc: int, add: Any) -> None:
    for name, top, bottom, goal in _RATIOS:
        num, den = find_row(sat, top, sc), find_row(sat, bottom, sc)
        if not (num and den):
            continue
        ratio = num["rps"] / den["rps"]
        add(name, f">= {goal}x", round(ratio, 2), ratio >= goal, f"saturation req/s at c={sc}")
        if "workers" in name:
            continue  # per core, 2 workers are not faster: what they add is a core
        if num.get("rps_per_core") and den.get("rps_per_core"):
            ratio = num["rps_per_core"] / den["rps_per_core"]
            add(f"{name}, per CPU core", f">= {goal}x", round(ratio, 2), ratio >= goal,
                f"req/s per guard core at c={sc} (robust to a busy machine)")  # fmt: skip
