"""vLLM decode throughput with the guard plugin absent, loaded but inactive, and active.

    .venv/bin/python -m benchmarks.plugin_throughput [--model arithmetic|smollm2|DIR]

Two vLLM servers on the same model, started by this command: one with the plugin (it loads
by entry point) and one without it (the entry point is shadowed, see ``_without_plugin``).
Rounds rotate over three modes: ``absent`` (plain requests to the server without the plugin),
``inactive`` (plain requests to the server with it: the plugin returns at once when no row
carries parameters) and ``active`` (requests carrying the guard's noise + watermark
``vllm_xargs``). Each round is ``--concurrency`` requests of exactly ``--max-tokens`` tokens
(``ignore_eos``), sent at once; only one server is busy at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from guard_server.teacher import MODEL_DIR, task
from guard_server.testing import vllm_process
from guard_server.upstream.bundled_teacher import MODELS

XARGS = {
    "guard_noise_seed": 12345,
    "guard_noise_sigma": 1.0,
    "guard_noise_kind": "gumbel",
    "guard_wm_key": 987654321,
    "guard_wm_gamma": 0.25,
    "guard_wm_delta": 2.0,
}


SMOLLM2_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass(frozen=True, slots=True)
class Workload:
    """What to serve, how, and what to ask it."""

    model_dir: Path
    prompts: list[str]
    max_model_len: int = 256
    env: dict[str, str] = field(default_factory=dict)


def workload(model: str, count: int) -> Workload:
    """``arithmetic`` and ``smollm2`` are the managed models (SmolLM2: open-ended chat
    prompts, context 2,048, 2 GiB of KV cache); anything else is a model directory, asked the
    arithmetic teacher's questions."""
    if model == "smollm2":
        from guard_server.upstream import smollm2
        from load_tests.realmodel.questions import open_prompts

        spec = MODELS["smollm2"]
        pool = open_prompts("train")
        return Workload(
            smollm2.ensure_model(),
            [SMOLLM2_CHAT.format(pool[i % len(pool)]) for i in range(count)],
            spec.max_model_len,
            {"VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib)},
        )
    problems = task.make_problems(count, seed=3, split="heldout")
    directory = MODEL_DIR if model == "arithmetic" else Path(model)
    return Workload(directory, [task.completion_prompt(p.question) for p in problems])


async def one_round(url: str, prompts: list[str], max_tokens: int, active: bool) -> float:
    """Completion tokens per second for ``prompts`` sent all at once."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base_url=url, timeout=timeout) as http:

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
            async with http.post("/v1/completions", json=body) as response:
                response.raise_for_status()
                return (await response.json())["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return sum(tokens) / (time.perf_counter() - started)


def _without_plugin(directory: Path) -> dict[str, str]:
    """Environment for a vLLM that does not see the guard's ``vllm.logits_processors`` entry.

    ``importlib.metadata.entry_points`` keeps the first distribution of each name on the path,
    so a ``guard-server`` dist-info without entry points, earlier on PYTHONPATH, hides ours.
    """
    info = directory / "guard_server-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: guard-server\nVersion: 0\n")
    return {"PYTHONPATH": str(directory)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="arithmetic", help="arithmetic, smollm2, or a model directory"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    parser.add_argument(
        "--pause",
        type=float,
        default=5.0,
        help="seconds between rounds: a server that just finished keeps its threads spinning "
        "for a while, which slows the other one's round",
    )
    args = parser.parse_args(argv)
    work = workload(args.model, args.concurrency)
    prompts = work.prompts
    workdir = Path(tempfile.mkdtemp(prefix="plugin-throughput-"))
    servers = {
        "with": vllm_process(
            work.model_dir,
            workdir / "with.log",
            max_model_len=work.max_model_len,
            env=work.env,
        ),
        "without": vllm_process(
            work.model_dir,
            workdir / "without.log",
            max_model_len=work.max_model_len,
            env={**work.env, **_without_plugin(workdir / "shadow")},
        ),
    }
    modes = {"absent": "without", "inactive": "with", "active": "with"}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_healthy(600)
        for mode, server in modes.items():  # warm-up rounds, not counted
            asyncio.run(one_round(servers[server].url, prompts, args.max_tokens, mode == "active"))
        for _ in range(args.rounds):
            for mode, server in modes.items():
                url = servers[server].url
                time.sleep(args.pause)
                rate = asyncio.run(one_round(url, prompts, args.max_tokens, mode == "active"))
                rates[mode].append(rate)
                print(f"{mode:<9} {rate:8.1f} tokens/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    summary = {mode: round(statistics.median(r), 1) for mode, r in rates.items()}
    summary["inactive/absent"] = round(summary["inactive"] / summary["absent"], 3)
    summary["active/absent"] = round(summary["active"] / summary["absent"], 3)
    print(
        json.dumps(
            {
                "model": args.model,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "median_tokens_per_s": summary,
                "paired": {
                    f"{mode}/absent": _paired(rates[mode], rates["absent"])
                    for mode in ("inactive", "active")
                },
            }
        )
    )
    return 0


def _paired(rates: list[float], baseline: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios: each round against the baseline round
    run seconds before it, which cancels the machine's slower drifts."""
    ratios = [rate / base for rate, base in zip(rates, baseline, strict=True)]
    if len(ratios) < 2:
        return {"median": round(ratios[0], 3)}
    low, median, high = statistics.quantiles(ratios, n=4)
    return {"q1": round(low, 3), "median": round(median, 3), "q3": round(high, 3)}


if __name__ == "__main__":
    raise SystemExit(main())
