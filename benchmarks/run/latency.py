"""Latency phases at concurrency 1, targets interleaved request by request: whole answers
and stream timing (the Python client)."""

from __future__ import annotations

from typing import Any

from benchmarks import loadgen
from benchmarks.loadgen import summary_ms
from benchmarks.run.bench import Bench


def phase_latency(bench: Bench) -> dict[str, Any]:
    """Concurrency 1, targets interleaved request by request (same moments, same noise)."""
    bench.wait_litellm()
    plan = [
        ("direct (fake upstream)", "direct", "pass", "chat"),
        ("guard pass-through", "g_pass", "pass", "chat"),
        ("guard default policy", "g_default", "default", "chat"),
        ("guard default + limits, memory", "g_limits", "limited", "chat"),
        ("guard default + limits, redis", "g_redis", "limited", "chat"),
        ("guard pass-through, 2 workers", "g_2w", "pass", "chat"),
        ("guard default + limits, 2 workers (redis)", "g_2w", "limited", "chat"),
    ]
    if "litellm" in bench.services:
        plan.append(("LiteLLM proxy", "litellm", "pass", "chat"))
    targets = bench.write_service_targets("latency", plan)
    n = bench.options.latency_requests
    data = loadgen.python_client(
        "paired",
        ["--targets", str(targets), "--requests", str(n),
         "--max-seconds", str(max(30.0, n * 0.1))],
        bench.layout.load,
        timeout_s=max(90.0, n * 0.2),
    )  # fmt: skip
    direct = data["latency_s"][plan[0][0]]
    rows = []
    for label, *_ in plan:
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
    targets = bench.write_service_targets("stream", plan)
    n = bench.options.stream_requests
    data = loadgen.python_client(
        "stream",
        ["--targets", str(targets), "--requests", str(n),
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
