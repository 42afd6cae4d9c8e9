"""Added latency of the guard: the same non-streaming request, direct to vLLM and through the
guard, interleaved one by one in the same run (concurrency 1).

    .venv/bin/python -m benchmarks.latency_vs_direct --requests 300

Starts real vLLM (CPU) on the bundled teacher and a guard in front of it, unless
``--vllm-url`` / ``--guard-url`` point at running ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from guard_server.teacher import MODEL_DIR
from guard_server.teacher.task import completion_prompt, make_problems
from guard_server.testing import (
    DEMO_KEY,
    GuardProcess,
    running_vllm,
    vllm_process,
    write_test_config,
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(vllm_url: str, guard_url: str, requests: int, max_tokens: int) -> dict:
    """Time ``requests`` pairs (direct, guard) of identical greedy completions."""
    prompts = [completion_prompt(p.question) for p in make_problems(requests, 5, "heldout")]
    direct, guarded = [], []
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    async with aiohttp.ClientSession() as session:

        async def once(url: str, prompt: str) -> float:
            body = {"model": "teacher", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0}  # fmt: skip
            started = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, await r.text()
            return time.perf_counter() - started

        for prompt in prompts[:10]:  # warm-up
            await once(vllm_url, prompt)
            await once(guard_url, prompt)
        for i, prompt in enumerate(prompts):
            # Alternate which goes first so neither side always meets a warmer cache.
            if i % 2:
                direct.append(await once(vllm_url, prompt))
                guarded.append(await once(guard_url, prompt))
            else:
                guarded.append(await once(guard_url, prompt))
                direct.append(await once(vllm_url, prompt))
    paired = [g - d for g, d in zip(guarded, direct, strict=True)]
    ms = 1000.0
    return {
        "requests": requests,
        "direct_p50_ms": statistics.median(direct) * ms,
        "guard_p50_ms": statistics.median(guarded) * ms,
        "added_p50_ms": (statistics.median(guarded) - statistics.median(direct)) * ms,
        "paired_diff_p50_ms": statistics.median(paired) * ms,
        "direct_p90_ms": _percentile(direct, 0.9) * ms,
        "guard_p90_ms": _percentile(guarded, 0.9) * ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--vllm-url")
    parser.add_argument("--guard-url")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    with contextlib.ExitStack() as running:
        vllm_url = args.vllm_url
        if not vllm_url:
            vllm = vllm_process(MODEL_DIR, workdir / "vllm.log")
            seconds = running.enter_context(running_vllm(vllm, timeout_s=300))
            print(f"vLLM healthy after {seconds:.1f} s")
            vllm_url = vllm.url
        guard_url = args.guard_url
        if not guard_url:
            config = write_test_config(workdir, [vllm_url])
            guard_url = running.enter_context(GuardProcess(config, workdir / "guard.log")).url
        result = asyncio.run(measure(vllm_url, guard_url, args.requests, args.max_tokens))
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
