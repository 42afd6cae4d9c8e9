"""vLLM decode throughput with the guard plugin active (noise + watermark xargs) vs inactive rows.

    .venv/bin/python -m benchmarks.plugin_throughput --model guard_server/teacher/model

One vLLM (the plugin loads by entry point); rounds alternate plain requests (the plugin returns
at once when no row carries parameters) and requests carrying the guard's ``vllm_xargs``, each
round ``--concurrency`` requests of exactly ``--max-tokens`` tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from guard_server.teacher import task
from guard_server.upstream.vllm_process import VllmProcess

XARGS = {
    "guard_noise_seed": 12345,
    "guard_noise_sigma": 1.0,
    "guard_noise_kind": "gumbel",
    "guard_wm_key": 987654321,
    "guard_wm_gamma": 0.25,
    "guard_wm_delta": 2.0,
}


async def one_round(url: str, prompts: list[str], max_tokens: int, active: bool) -> float:
    """Completion tokens per second for ``prompts`` sent all at once."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one(i: int, prompt: str) -> int:
            body: dict[str, object] = {
                "model": "teacher",
                "prompt": prompt,
                "temperature": 1.0,
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }
            if active:
                body["vllm_xargs"] = {**XARGS, "guard_noise_seed": 12345 + i}
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return sum(tokens) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("guard_server/teacher/model"))
    parser.add_argument("--url", default=None, help="an already running vLLM (with the plugin)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    args = parser.parse_args(argv)
    problems = task.make_problems(args.concurrency, seed=3, split="heldout")
    prompts = [task.completion_prompt(p.question) for p in problems]
    vllm = None
    url = args.url
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="plugin-throughput-")) / "vllm.log"
        vllm = VllmProcess(args.model, "teacher", log_path=log)
        vllm.start()
        vllm.wait_healthy(600)
        url = vllm.url
    try:
        for active in (False, True):  # warm-up rounds, not counted
            asyncio.run(one_round(url, prompts, args.max_tokens, active))
        rates: dict[str, list[float]] = {"inactive": [], "active": []}
        for _ in range(args.rounds):
            for mode in ("inactive", "active"):
                rate = asyncio.run(one_round(url, prompts, args.max_tokens, mode == "active"))
                rates[mode].append(rate)
                print(f"{mode:<9} {rate:8.1f} tokens/s", flush=True)
    finally:
        if vllm is not None:
            vllm.stop()
    summary = {mode: round(statistics.median(r), 1) for mode, r in rates.items()}
    summary["active/inactive"] = round(summary["active"] / summary["inactive"], 3)
    print(
        json.dumps(
            {
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "median_tokens_per_s": summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
