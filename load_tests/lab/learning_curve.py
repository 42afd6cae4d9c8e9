"""Distillation learning curve: student held-out accuracy against the number of teacher answers.

    .venv/bin/python -m load_tests.lab.learning_curve --base-url http://127.0.0.1:8311

Collects sampled (temperature 1.0 by default) teacher answers to training-split questions
through ``/v1/completions``, then trains one fresh student per size N on the first N pairs
and prints a Markdown table of N against the student's greedy held-out exact-match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import torch

from guard_server.teacher import task
from load_tests.lab import student


async def collect(
    base_url: str,
    model: str | None,
    problems: list[task.Problem],
    temperature: float,
    concurrency: int,
    max_tokens: int = 32,
) -> list[str]:
    """The teacher's answer text to each problem, one ``/v1/completions`` request each.

    Request ``i`` carries ``seed=i``, so a rerun against the same server repeats the samples.
    """
    base_url = base_url.rstrip("/")
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if model is None:
            async with session.get(f"{base_url}/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]

        async def one(i: int, p: task.Problem) -> str:
            body = {
                "model": model,
                "prompt": task.completion_prompt(p.question),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": i,
            }
            async with sem, session.post(f"{base_url}/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"completions -> {resp.status}: {data}")
                return data["choices"][0]["text"]

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(problems))))


def _load_or_collect(args: argparse.Namespace, problems: list[task.Problem]) -> list[str]:
    cache: Path | None = args.cache
    if cache is not None and cache.exists():
        rows = [json.loads(line) for line in cache.read_text().splitlines()]
        rows = rows[: len(problems)]
        if [r["question"] for r in rows] == [p.question for p in problems]:
            print(f"using {len(rows)} cached teacher answers from {cache}", flush=True)
            return [r["answer"] for r in rows]
    start = time.monotonic()
    texts = asyncio.run(
        collect(args.base_url, args.model, problems, args.temperature, args.concurrency)
    )
    elapsed = time.monotonic() - start
    print(
        f"collected {len(texts)} teacher answers in {elapsed:.0f}s "
        f"({len(texts) / elapsed:.0f} req/s)",
        flush=True,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("w") as f:
            for p, t in zip(problems, texts, strict=True):
                f.write(json.dumps({"question": p.question, "answer": t}) + "\n")
    return texts


def main(argv: list[str] | None = None) -> None:
    """Collect teacher answers, train one student per size, print the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8311")
    ap.add_argument("--model", default=None, help="served model id (default: the first listed)")
    ap.add_argument("--sizes", default="1000,5000,20000,50000")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=None, help="JSONL file to reuse answers")
    ap.add_argument("--steps", type=int, default=student.StudentConfig().steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=1000)
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    problems = task.make_problems(max(sizes), seed=7, split="train")
    texts = _load_or_collect(args, problems)
    teacher_acc = sum(task.check(p, t) for p, t in zip(problems, texts, strict=True)) / len(texts)
    print(f"teacher answers correct: {teacher_acc:.4f} (T={args.temperature})", flush=True)

    tokenizer = student.load_tokenizer()
    heldout = task.make_problems(args.eval_n, seed=1, split="heldout")
    cfg = replace(student.StudentConfig(), steps=args.steps)
    pairs = [(task.completion_prompt(p.question), t) for p, t in zip(problems, texts, strict=True)]
    rows = []
    for n in sizes:
        acc, seconds = student.timed_run(pairs[:n], heldout, tokenizer, cfg, args.seed)
        epochs = cfg.steps * cfg.batch / n
        rows.append((n, epochs, seconds, acc))
        print(f"N={n}: held-out exact-match {acc:.4f} ({seconds:.0f}s)", flush=True)

    print()
    print(
        f"Student: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.steps} steps x batch "
        f"{cfg.batch}; held-out greedy exact-match on {len(heldout)} problems"
    )
    print()
    print("| teacher answers N | epochs | train time | student held-out exact-match |")
    print("|---:|---:|---:|---:|")
    for n, epochs, seconds, acc in rows:
        print(f"| {n:,} | {epochs:.1f} | {seconds:.0f} s | {acc:.1%} |")


if __name__ == "__main__":
    main()
