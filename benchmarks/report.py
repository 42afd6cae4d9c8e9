"""Render the benchmark results (benchmarks.run's JSON) as Markdown tables."""

#     python -m benchmarks.report benchmarks/results/results.json [--into BENCHMARKS.md]
#
# With ``--into``, the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in
# that file is replaced by the report (headings one level down); otherwise it is printed.

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.profile_summary import to_markdown

REPO = Path(__file__).resolve().parents[1]


def _rel(text: Any) -> str:
    """Paths and commands shown relative to the repository."""
    return str(text).replace(f"{REPO}/", "")


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _cores(row: dict[str, Any]) -> str:
    return ", ".join(f"{name}: {v:.2f}" for name, v in row.get("cpu_cores", {}).items())


def _meta(results: dict[str, Any]) -> list[str]:
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    busy = meta.get("busy")
    lines = ["## Run", ""]
    if busy:
        lines += [
            f"> **Busy machine**: other processes used {meta.get('other_load_cores')} CPU cores "
            "on average during this run (load average "
            f"{_f(meta.get('loadavg_start', [None])[0])} at the start). Absolute numbers are "
            "pessimistic and noisy; compare rows measured in the same run only.",
            "",
        ]
    lines += [
        f"- command: `{meta.get('command')}` (git {m.get('git_commit')}), started "
        f"{meta.get('started')}, {meta.get('wall_s')} s, {meta.get('duration_s_per_step')} s "
        "per load step",
        f"- machine: {m.get('nproc')} CPUs, {m.get('cpu_model')}, {m.get('ram_gb')} GiB RAM, "
        f"Linux {m.get('kernel')}; other load during the run: "
        f"{meta.get('other_load_cores')} cores",
        f"- versions: Python {m.get('python')}, aiohttp {m.get('aiohttp')}, uvloop "
        f"{m.get('uvloop')}, orjson {m.get('orjson')}, pydantic {m.get('pydantic')}, "
        f"prometheus-client {m.get('prometheus_client')}, redis-py {m.get('redis_py')}, "
        f"LiteLLM {m.get('litellm')}; {m.get('wrk')}; {m.get('redis_server')}; "
        f"{m.get('py_spy')}",
        f"- CPU pinning: {meta.get('layout')}",
        "",
    ]
    if meta.get("errors"):
        lines += ["**Errors:** " + "; ".join(f"{k}: {v}" for k, v in meta["errors"].items()), ""]
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    rows = [
        [t["target"], t["goal"], "–" if t["value"] is None else f"{t['value']:.3g}",
         {True: "yes", False: "**no**"}.get(t["met"], "–"), t["how"]]
        for t in results.get("targets", [])
    ]  # fmt: skip
    return ["## Targets", "", *_table(["target", "goal", "measured", "met", "how"], rows)]


def _saturation(results: dict[str, Any]) -> list[str]:
    rows = results.get("saturation")
    if not isinstance(rows, list):
        return ["## Saturation", "", f"not run: {rows}", ""]
    lines = [
        "## Saturation (wrk, closed loop, keep-alive)",
        "",
        "Non-streaming chat completions (16 tokens) unless noted; streams have 16 chunks. "
        "`cpu` is cores used during the step by the server under test, the fake upstream and "
        "redis; `other` is the rest of the machine; `req/s per core` divides by the first "
        "(the server under test), which is the figure that survives a busy machine.",
        "",
    ]
    titles = {
        "main": "Guard vs direct vs LiteLLM",
        "logprobs": "Logprobs (top 5): hardening cost",
        "state": "State backend: memory vs Redis (limits configured, detection on)",
        "workers": "One worker vs two (Redis backend, secret configured)",
        "stream": "Streaming",
    }
    header = [
        "setup", "c", "req/s", "req/s per core", "p50 ms", "p90 ms", "p99 ms", "errors", "cpu",
        "other",
    ]  # fmt: skip
    for group, title in titles.items():
        chosen = [r for r in rows if group in str(r.get("group", "")).split()]
        if not chosen:
            continue
        table = [
            [r["label"], r["concurrency"], round(r["rps"]),
             round(r["rps_per_core"]) if r.get("rps_per_core") else None, r["p50_ms"],
             r["p90_ms"], r["p99_ms"], r["errors"], _cores(r), r["other_load_cores"]]
            for r in chosen
        ]  # fmt: skip
        lines += [f"### {title}", "", *_table(header, table)]
    return lines


def _range(data: dict[str, Any], key: str) -> str:
    low, high = data.get(f"range_{key}") or ("-", "-")
    return f"{low} to {high}"


def _policy_cost(results: dict[str, Any]) -> list[str]:
    data = results.get("policy_cost") or {}
    if "rounds" not in data:
        return []
    table = [
        [i + 1, r["pass_on_default_rps"], r["default_rps"], r["cost_pct"],
         r.get("cost_cpu_pct", "-"), r["pass_rps"]]
        for i, r in enumerate(data["rounds"])
    ]  # fmt: skip
    return [
        f"## Default policy cost (wrk, c={data['concurrency']}, one guard process, its "
        "pass-through and default-tier clients in turn)",
        "",
        *_table(
            [
                "round",
                "pass-through client req/s",
                "default client req/s",
                "cost %",
                "cost % per CPU-second",
                "pass-through guard process req/s (reference)",
            ],
            table,
        ),
        f"Median cost: **{data['median_cost_pct']} %** (range "
        f"{_range(data, 'cost_pct')}); per CPU-second of the guard: "
        f"**{data.get('median_cost_cpu_pct', '-')} %** (range {_range(data, 'cost_cpu_pct')}).",
        "",
    ]


def _upstream(results: dict[str, Any]) -> list[str]:
    data = results.get("upstream_capacity") or {}
    if "rows" not in data:
        return []
    table = [
        [r["body"], r["concurrency"], round(r["rps"]), r["p50_ms"], r["p99_ms"], _cores(r)]
        for r in data["rows"]
    ]
    return [
        "## Fake upstream capacity",
        "",
        f"`benchmarks/fake_upstream.py` alone, pinned to CPU {data['cpus']}, wrk on the other.",
        "",
        *_table(["body", "c", "req/s", "p50 ms", "p99 ms", "cpu"], table),
    ]


def _fixed(results: dict[str, Any]) -> list[str]:
    data = results.get("fixed_rate") or {}
    if "rows" not in data:
        return []
    table = [
        [r["label"], round(r["achieved_rps"]), r["p50_ms"], r["p90_ms"], r["p99_ms"],
         r.get("added_p50_ms"), r.get("added_p99_ms"), r["errors"], _cores(r)]
        for r in data["rows"]
    ]  # fmt: skip
    return [
        f"## Fixed rate: {data['rate_rps']} req/s ({data['reference']}), hey",
        "",
        *_table(
            ["setup", "req/s", "p50 ms", "p90 ms", "p99 ms", "added p50", "added p99", "errors",
             "cpu"],
            table,
        ),
    ]  # fmt: skip


def _latency(results: dict[str, Any]) -> list[str]:
    data = results.get("latency_c1") or {}
    if "rows" not in data:
        return []
    table = []
    for r in data["rows"]:
        paired = r.get("paired_diff", {})
        table.append(
            [r["label"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r.get("added_p50_ms"),
             paired.get("p50_ms"), paired.get("p99_ms")]
        )  # fmt: skip
    return [
        f"## Latency at concurrency 1 ({data['requests']} requests per setup, interleaved)",
        "",
        f"Client: {data['client']}. `paired` = per-request guard minus the direct request "
        "sent just before or after it.",
        "",
        *_table(
            ["setup", "p50 ms", "p90 ms", "p99 ms", "added p50", "paired p50", "paired p99"],
            table,
        ),
    ]


def _stream(results: dict[str, Any]) -> list[str]:
    data = results.get("stream_timing") or {}
    if "rows" not in data:
        return []
    table = []
    for r in data["rows"]:
        per_chunk = r.get("added_per_chunk_p50_ms")
        table.append(
            [r["label"], r["chunks_seen"], r["first_chunk"]["p50_ms"], r["first_chunk"]["p99_ms"],
             r["total"]["p50_ms"], r.get("added_first_chunk_p50_ms"),
             None if per_chunk is None else per_chunk * 1000]
        )  # fmt: skip
    return [
        f"## Streaming at concurrency 1 ({data['requests']} streams of {data['chunks']} chunks "
        "per setup, interleaved)",
        "",
        "Added per chunk = (p50 of total minus first-chunk time, guard) minus the same for "
        "direct, divided by chunks − 1. The fake upstream sends chunks back to back, so this is "
        "the guard's processing cost per chunk.",
        "",
        *_table(
            ["setup", "chunks", "first chunk p50 ms", "first chunk p99 ms", "total p50 ms",
             "added first chunk ms", "added per chunk µs"],
            table,
        ),
    ]  # fmt: skip


def _profile(results: dict[str, Any]) -> list[str]:
    data = results.get("profile") or {}
    if "skipped" in data or "error" in data:
        return ["## Profile", "", f"not run: {data.get('skipped') or data.get('error')}", ""]
    lines = ["## Profile (py-spy, samples holding the GIL, 1-worker guard at saturation)", ""]
    for name, entry in data.items():
        if "summary" not in entry:
            continue
        lines.append(f"Command: `{_rel(entry.get('raw_command'))}` during wrk at "
                     f"{round(entry['load_rps'])} req/s; raw stacks: "
                     f"`{_rel(entry.get('raw_file'))}`"
                     + (f"; flame graph: `{_rel(entry['flamegraph_file'])}`"
                        if entry.get("flamegraph_file") else ""))  # fmt: skip
        lines.append("")
        summary = entry["summary"]
        trimmed = {**summary, "self_top_functions": summary["self_top_functions"][:15]}
        lines += [to_markdown(trimmed, f"{name}: body `{entry['body']}`"), ""]
    return lines


def _scale(results: dict[str, Any]) -> list[str]:
    data = results.get("scale") or {}
    if "rows" not in data:
        return ["## Clients in state", "", f"not run: {data}", ""]
    table, memory = [], []
    for r in data["rows"]:
        sat = r["saturation"]
        table.append(
            [r["clients"], round(r["policy_file_bytes"] / 2**20, 1), r["config_load_s"],
             r["startup_s"], r["populate"]["method"], r["latency_guard"]["p50_ms"],
             r["added_p50_ms"], r["added_p99_ms"], round(sat["rps"]), _cores(sat)]
        )  # fmt: skip
        memory.append(
            [r["clients"], r["rss_after_load_mb"], r["rss_populated_mb"], r.get("rss_peak_mb"),
             r.get("config_bytes_per_client"), r.get("total_bytes_per_client"),
             r.get("clients_deep_mb"), r.get("store_deep_mb"),
             r.get("clients_deep_bytes_per_client"), r.get("store_deep_bytes_per_client")]
        )  # fmt: skip
    return [
        "## Memory and overhead vs number of clients",
        "",
        f"Tier: {data['tier']}. Each client is configured (hash only) and sent one request "
        f"(over HTTP up to {data['http_populate_max']:,} clients, above that folded into the "
        "store in process: the same `observe` + `admit` + `settle` calls, without HTTP). Then "
        "latency (c=1, random client per request) and saturation (wrk c=16, random client).",
        "",
        *_table(
            ["clients", "policy MB", "config load s", "startup s", "population", "p50 ms",
             "added p50 ms", "added p99 ms", "req/s", "cpu"],
            table,
        ),
        "Memory. RSS is measured after `gc.collect()` and `malloc_trim(0)`; per-client RSS "
        "figures are differences to the 1-client row, and mix in what the config loader freed "
        "but the allocator kept. The exact figures are the deep sizes: every object reachable "
        "from `settings.clients_by_key_hash` (config) and from the `MemoryStore` (buckets, "
        "risk profiles, campaign sketches), each counted once.",
        "",
        *_table(
            ["clients", "RSS loaded MB", "RSS populated MB", "peak RSS MB",
             "RSS B/client (load)", "RSS B/client (total)", "config deep MB", "store deep MB",
             "config B/client", "state B/client"],
            memory,
        ),
    ]  # fmt: skip


def _scale_profiles(results: dict[str, Any]) -> list[str]:
    lines = []
    for row in (results.get("scale") or {}).get("rows", []):
        entry = row.get("profile")
        if entry and "summary" in entry:
            summary = entry["summary"]
            trimmed = {**summary, "self_top_functions": summary["self_top_functions"][:15]}
            lines += [
                f"Command: `{_rel(entry['raw_command'])}` during wrk at "
                f"{round(entry['load_rps'])} req/s "
                f"(random client of {row['clients']:,} per request).",
                "",
                to_markdown(trimmed, f"profile with {row['clients']:,} clients"),
                "",
            ]
    return lines


def _vllm(results: dict[str, Any]) -> list[str]:
    data = results.get("e2e_vllm") or {}
    if "latency_c1" not in data:
        reason = data.get("skipped") or data.get("error") or "not run"
        return ["## End to end: real vLLM (CPU), bundled teacher", "", f"Skipped: {reason}.", ""]
    table = [
        [r["label"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r.get("added_p50_ms")]
        for r in data["latency_c1"]
    ]
    sat = [
        [r["label"], r["concurrency"], round(r["rps"]), r["p50_ms"], r["p99_ms"], r["errors"]]
        for r in data["saturation_c8"]
    ]
    return [
        "## End to end: real vLLM (CPU), bundled teacher",
        "",
        f"Model {data['model_dir']}, vLLM healthy after {_f(data['vllm_startup_s'], 1)} s; "
        f"completions, 16 tokens, greedy; {data['requests']} requests per setup at c=1.",
        "",
        *_table(["setup", "p50 ms", "p90 ms", "p99 ms", "added p50 ms"], table),
        *_table(["setup", "c", "req/s", "p50 ms", "p99 ms", "errors"], sat),
    ]


def _metrics(results: dict[str, Any]) -> list[str]:
    data = results.get("guard_metrics") or {}
    if not data or "error" in data or "skipped" in data:
        return []
    lines = ["## What the guards counted (`/metrics` at the end of the load steps)", ""]
    for name, counts in data.items():
        parts = [f"`{series}` {int(value)}" for series, value in sorted(counts.items())]
        lines.append(f"- {name}: " + ", ".join(parts))
    return [*lines, ""]


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    lines = ["# guard-server benchmark results", ""]
    for part in (
        _meta,
        _targets,
        _upstream,
        _saturation,
        _policy_cost,
        _fixed,
        _latency,
        _stream,
        _profile,
        _scale,
        _scale_profiles,
        _vllm,
        _metrics,
    ):
        try:
            lines += part(results)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            lines += [f"(section {part.__name__} could not be rendered: {exc!r})", ""]
    return "\n".join(lines).rstrip() + "\n"


START, END = "<!-- results:start -->", "<!-- results:end -->"


def embed(document: str, report: str) -> str:
    """``document`` with the part between the markers replaced by ``report``."""
    head, found, rest = document.partition(START)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"the document has no {START} ... {END} section")
    body = "\n".join(
        "#" + line if line.startswith("#") else line for line in report.splitlines()[2:]
    )
    return f"{head}{START}\n{body.strip()}\n{END}{tail}"


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--into", type=Path, help="a Markdown file with the results markers")
    args = parser.parse_args()
    report = render_markdown(json.loads(args.results.read_text()))
    if args.into is None:
        print(report, end="")
        return
    args.into.write_text(embed(args.into.read_text(), report))


if __name__ == "__main__":
    main()
