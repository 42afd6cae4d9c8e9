"""Greedy exact-match of the teacher on held-out problems, through an OpenAI-compatible server.

    .venv/bin/python -m load_tests.lab.eval_teacher --base-url http://127.0.0.1:8311

It starts nothing: point it at a running vLLM (or at the guard in front of one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp

from guard_server.teacher import task


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], sem: asyncio.Semaphore
) -> dict[str, Any]:
    async with sem, session.post(url, json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url} -> {resp.status}: {data}")
        return data


async def completion_texts(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    questions: list[str],
    concurrency: int,
    max_tokens: int = 32,
) -> list[str]:
    """Greedy answers via ``/v1/completions`` with ``task.completion_prompt``."""
    sem = asyncio.Semaphore(concurrency)
    bodies = [
        {
            "model": model,
            "prompt": task.completion_prompt(q),
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for q in questions
    ]
    url = f"{base_url}/v1/completions"
    results = await asyncio.gather(*(_post(session, url, b, sem) for b in bodies))
    return [r["choices"][0]["text"] for r in results]


async def chat_texts(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    questions: list[str],
    concurrency: int,
    max_tokens: int = 32,
) -> list[str]:
    """Greedy answers via ``/v1/chat/completions`` with one user message."""
    sem = asyncio.Semaphore(concurrency)
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": q}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for q in questions
    ]
    url = f"{base_url}/v1/chat/completions"
    results = await asyncio.gather(*(_post(session, url, b, sem) for b in bodies))
    return [r["choices"][0]["message"]["content"] for r in results]


async def prompt_ids_agree(
    session: aiohttp.ClientSession, base_url: str, model: str, questions: list[str]
) -> int:
    """How many questions tokenize to the same ids on the completions and the chat paths.

    Uses vLLM's ``/tokenize`` (not part of the OpenAI API); it mirrors what each route feeds
    the model: the prompt with special tokens added, and the chat template without them.
    """
    sem = asyncio.Semaphore(16)
    url = f"{base_url}/tokenize"
    same = 0
    for q in questions:
        plain, chat = await asyncio.gather(
            _post(session, url, {"model": model, "prompt": task.completion_prompt(q)}, sem),
            _post(
                session,
                url,
                {
                    "model": model,
                    "messages": [{"role": "user", "content": q}],
                    "add_generation_prompt": True,
                },
                sem,
            ),
        )
        same += plain["tokens"] == chat["tokens"]
    return same


async def run(base_url: str, model: str | None, n: int, seed: int, concurrency: int) -> dict:
    """Evaluate both routes on ``n`` held-out problems; return a summary dict."""
    base_url = base_url.rstrip("/")
    problems = task.make_problems(n, seed=seed, split="heldout")
    questions = [p.question for p in problems]
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if model is None:
            async with session.get(f"{base_url}/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
        summary: dict[str, Any] = {"model": model, "n": n, "seed": seed}
        for name, fn in (("completions", completion_texts), ("chat", chat_texts)):
            start = time.monotonic()
            texts = await fn(session, base_url, model, questions, concurrency)
            elapsed = time.monotonic() - start
            correct = sum(task.check(p, t) for p, t in zip(problems, texts, strict=True))
            summary[name] = {
                "exact_match": correct / n,
                "correct": correct,
                "seconds": round(elapsed, 1),
                "req_per_s": round(n / elapsed, 1),
                "sample": texts[:3],
            }
            summary[f"_{name}_texts"] = texts
        comp, chat = summary.pop("_completions_texts"), summary.pop("_chat_texts")
        summary["routes_same_text"] = sum(a == b for a, b in zip(comp, chat, strict=True)) / n
        try:
            k = min(n, 50)
            summary["prompt_ids_identical"] = (
                f"{await prompt_ids_agree(session, base_url, model, questions[:k])}/{k}"
            )
        except (RuntimeError, aiohttp.ContentTypeError) as exc:  # no /tokenize: not vLLM
            summary["prompt_ids_identical"] = f"unavailable: {exc}"
    return summary


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, evaluate, print the summary as JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8311")
    ap.add_argument("--model", default=None, help="served model id (default: the first listed)")
    ap.add_argument("--n", type=int, default=1000, help="held-out problems (>= 500)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args(argv)
    summary = asyncio.run(run(args.base_url, args.model, args.n, args.seed, args.concurrency))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
