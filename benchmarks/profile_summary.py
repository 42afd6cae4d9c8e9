"""Summarize py-spy's raw (collapsed-stack) output: where the guard's CPU time goes."""

#     python -m benchmarks.profile_summary profile.txt [--top 25]
#
# Each input line is ``frame;frame;...;leaf count`` with frames ``function (file)``
# (``py-spy record --format raw --nolineno``). Native code (orjson, hashlib, the aiohttp C
# parser, uvloop) has no frame of its own: it is counted in the Python function that called it.

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

# Leaf-frame categories, first match wins: (category, substrings of the frame's file).
_CATEGORIES = (
    ("prometheus_client (metrics)", ("prometheus_client/",)),
    ("logging", ("logging/",)),
    ("pydantic", ("pydantic",)),
    ("redis client", ("redis/",)),
    ("guard: generation handler", ("guard_server/generation.py",)),
    ("guard: pipeline stages", ("guard_server/pipeline/",)),
    ("guard: detection", ("guard_server/detection/",)),
    ("guard: state store", ("guard_server/state/",)),
    ("guard: defences (logprob noise, keys)", ("guard_server/defences/",)),
    ("guard: other", ("guard_server/",)),
    ("socket writes (aiohttp http_writer, both sides)", ("aiohttp/http_writer.py",)),
    ("aiohttp client (upstream side)", (
        "aiohttp/client", "aiohttp/connector.py", "aiohttp/streams.py",
        "aiohttp/client_proto.py", "aiohttp/tracing.py", "aiohttp/cookiejar.py",
    )),
    ("aiohttp server (client side)", ("aiohttp/web", "aiohttp/http_", "aiohttp/base_protocol")),
    ("aiohttp other", ("aiohttp/",)),
    ("multidict / yarl", ("multidict/", "yarl/")),
    ("event loop (uvloop, native: I/O and callbacks)", ("asyncio/", "uvloop/")),
    ("threads (config watcher: files_digest)", ("concurrent/futures/", "threading.py")),
)  # fmt: skip

# Inclusive time of the request path's steps: (label, a substring of a frame).
_STEPS = (
    ("GenerationHandler.__call__ (whole guarded request)", "GenerationHandler.__call__ ("),
    ("authenticate", "authenticate (guard_server/pipeline/auth.py)"),
    ("read + parse body", "_read_body ("),
    ("parse_json_object", "parse_json_object ("),
    ("validate_request", "validate_request ("),
    ("score (extract_features + observe + assess)", "RiskScorer.__call__ ("),
    ("apply_tier_policy", "apply_tier_policy ("),
    ("admit (rate limits)", "Admitter.__call__ ("),
    ("plan", "Planner.__call__ ("),
    ("rewrite_for_upstream (orjson.dumps)", "rewrite_for_upstream ("),
    ("upstream POST (aiohttp client)", "ModelUpstream.post ("),
    ("relay whole response", "GenerationHandler._relay_whole ("),
    ("transform_response", "transform_response ("),
    ("relay stream (_pump)", "GenerationHandler._pump ("),
    ("transform_chunk", "transform_chunk ("),
    ("logprob hardening", "LogprobHardening.apply ("),
    ("record (prometheus)", "record (guard_server/pipeline/record.py)"),
    ("settle (task)", "Admitter._settle ("),
    ("audit", "AuditLog.write ("),
    ("aiohttp server: response write", "StreamResponse.write ("),
    ("aiohttp server: send headers / prepare", "StreamResponse.prepare ("),
    ("config watcher: files_digest", "files_digest ("),
)


def parse(text: str) -> list[tuple[list[str], int]]:
    """The stacks (root first) and their sample counts."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def _category(frame: str) -> str:
    for name, needles in _CATEGORIES:
        if any(needle in frame for needle in needles):
            return name
    return "other"


def summarize(text: str, top: int = 25) -> dict[str, Any]:
    """Self time by function and by category, inclusive time by request step (% of samples)."""
    stacks = parse(text)
    total = sum(count for _, count in stacks) or 1
    leaf: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    for frames, count in stacks:
        leaf[frames[-1]] += count
        categories[_category(frames[-1])] += count
        joined = ";".join(frames)
        for label, needle in _STEPS:
            if needle in joined:
                steps[label] += count

    def share(counter: Counter[str], limit: int | None = None) -> list[dict[str, Any]]:
        return [
            {"name": name, "samples": n, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "self_by_category": share(categories),
        "self_top_functions": share(leaf, top),
        "inclusive_by_step": [
            {"name": name, "samples": steps[name], "percent": round(100 * steps[name] / total, 1)}
            for name, _ in _STEPS
            if steps[name]
        ],
    }


def to_markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as Markdown tables."""
    lines = [f"### {title}", "", f"{summary['samples']} samples.", ""]
    for key, heading in (
        ("self_by_category", "self time by category (leaf frame)"),
        ("inclusive_by_step", "inclusive time by step of the request path"),
        ("self_top_functions", "top functions by self time"),
    ):
        lines += [f"| {heading} | % |", "|---|---:|"]
        lines += [f"| `{row['name']}` | {row['percent']} |" for row in summary[key]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(to_markdown(summarize(args.file.read_text(), args.top), str(args.file)))


if __name__ == "__main__":
    main()
