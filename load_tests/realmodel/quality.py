"""Honest quality on SmolLM2: what each tier and plugin setting costs an honest user.

    .venv/bin/python -m load_tests.realmodel.quality [--vllm-url URL] [--out results.json]

Every question of ``questions.items()`` is asked through a real guard as a chat whose
assistant turn starts with the question's stem (``continue_final_message``), greedy unless
``--temperatures`` says otherwise, with ``top_logprobs`` 5. Per tier: accuracy, agreement
with the undefended greedy answer (the trusted tier at T = 0: the first sentence of the
continuation, compared as text), and the calibration of the returned logprobs: confidence =
exp(sum of the returned logprobs of the answer's first-sentence tokens), correct = the
checker's verdict; expected calibration error (10 bins) and Brier score.

``--direct`` asks a vLLM without a guard (for the float32 / bfloat16 comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from load_tests.attacks.honest_cost import brier, ece
from load_tests.realmodel import stack
from load_tests.realmodel.questions import Item, first_sentence, items


@dataclass(frozen=True, slots=True)
class Answer:
    """One continuation and the returned logprob of each of its tokens."""

    text: str
    tokens: tuple[tuple[str, float], ...]

    @property
    def span(self) -> str:
        """The answer proper: the continuation's first sentence, trimmed."""
        return first_sentence(self.text).strip()

    def first_token_confidence(self) -> float:
        """exp(the first token's logprob): the model's confidence in how the answer starts."""
        return math.exp(self.tokens[0][1]) if self.tokens else 0.0

    def confidence(self) -> float:
        """exp(sum of the logprobs of the tokens that make up the first sentence)."""
        end = len(first_sentence(self.text).rstrip())
        total, position = 0.0, 0
        for token, value in self.tokens:
            if position >= end:
                break
            total += value
            position += len(token)
        return math.exp(total)


def chat_body(item: Item, temperature: float, max_tokens: int, logprobs: int) -> dict[str, Any]:
    """The request: the question, then the stem as the start of the assistant's turn."""
    body: dict[str, Any] = {
        "model": stack.MODEL,
        "messages": [
            {"role": "user", "content": item.question},
            {"role": "assistant", "content": item.stem},
        ],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if logprobs:
        body.update(logprobs=True, top_logprobs=logprobs)
    return body


def ask(
    base_url: str,
    api_key: str | None,
    questions: Sequence[Item],
    *,
    temperature: float = 0.0,
    max_tokens: int = 16,
    logprobs: int = 5,
    workers: int = 16,
) -> list[Answer]:
    """Ask every question (``seed`` = its index, so sampled runs repeat); answers in order."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as http:

        def one(indexed: tuple[int, Item]) -> Answer:
            index, item = indexed
            body = chat_body(item, temperature, max_tokens, logprobs)
            body["seed"] = index
            response = http.post("/chat/completions", json=body)
            response.raise_for_status()
            choice = response.json()["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            tokens = tuple((c["token"], float(c["logprob"])) for c in content)
            return Answer(choice["message"]["content"] or "", tokens)

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, enumerate(questions)))


@dataclass(frozen=True, slots=True)
class Quality:
    """What one client got."""

    client: str
    temperature: float
    accuracy: float
    agreement: float  # same first sentence as the undefended greedy answer
    ece: float
    brier: float
    mean_confidence: float
    first_token_ece: float
    first_token_brier: float
    by_category: dict[str, float]


def score(
    client: str,
    temperature: float,
    questions: Sequence[Item],
    answers: Sequence[Answer],
    reference: Sequence[Answer],
) -> Quality:
    """Accuracy, agreement with ``reference`` and calibration of ``answers``."""
    correct = [q.check(a.text) for q, a in zip(questions, answers, strict=True)]
    confidence = [a.confidence() for a in answers]
    first = [a.first_token_confidence() for a in answers]
    same = [a.span == r.span for a, r in zip(answers, reference, strict=True)]
    categories: dict[str, list[bool]] = {}
    for q, hit in zip(questions, correct, strict=True):
        categories.setdefault(q.category, []).append(hit)
    return Quality(
        client,
        temperature,
        sum(correct) / len(correct),
        sum(same) / len(same),
        ece(confidence, correct),
        brier(confidence, correct),
        sum(confidence) / len(confidence),
        ece(first, correct),
        brier(first, correct),
        {c: round(sum(h) / len(h), 3) for c, h in categories.items()},
    )


def markdown(rows: Sequence[Quality]) -> str:
    """The results table."""
    lines = [
        "| client (tier) | T | accuracy | agreement with undefended greedy | answer ECE "
        "| Brier | mean confidence | first-token ECE | first-token Brier |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.client} | {r.temperature:g} | {r.accuracy:.1%} | {r.agreement:.1%} "
        f"| {r.ece:.3f} | {r.brier:.3f} | {r.mean_confidence:.3f} "
        f"| {r.first_token_ece:.3f} | {r.first_token_brier:.3f} |"
        for r in rows
    ]
    return "\n".join(lines)


def side_by_side(
    questions: Sequence[Item], answers: dict[str, list[Answer]], picks: Sequence[int]
) -> str:
    """A few answers of every client next to each other."""
    names = list(answers)
    lines = ["| question | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in picks:
        cells = [answers[n][i].span.replace("|", "/") or "(empty)" for n in names]
        lines.append(f"| {questions[i].stem} … | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CLIENTS = (
    "trusted", "default",
    *(f"noise{s:g}" for s in stack.SIGMAS),
    *(f"wm{d:g}" for d in stack.DELTAS),
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vllm-url", default=None, help="reuse a vLLM serving SmolLM2 (plugin on)")
    ap.add_argument("--direct", default=None, help="ask this vLLM directly, greedy, no guard")
    ap.add_argument(
        "--reference", type=Path, default=None, help="with --direct: agreement with this --out"
    )
    ap.add_argument("--dtype", default=None, help="start vLLM with this dtype (default float32)")
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--temperatures", default="0", help="comma-separated")
    ap.add_argument("--limit", type=int, default=0, help="only the first N questions")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    questions = items()[: args.limit or None]
    results: dict[str, Any] = {"questions": len(questions)}

    def keep(got: Sequence[Answer]) -> list[dict[str, Any]]:
        return [{"text": a.text, "tokens": a.tokens} for a in got]

    if args.direct:
        answers = ask(args.direct.rstrip("/") + "/v1", None, questions)
        reference = answers
        if args.reference:
            saved = json.loads(args.reference.read_text())["answers"]["direct"]
            reference = [Answer(a["text"], ()) for a in saved]
        row = score("direct", 0.0, questions, answers, reference)
        print(markdown([row]))
        results["rows"] = [asdict(row)]
        results["answers"] = {"direct": keep(answers)}
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="realmodel-quality-"))
        temperatures = [float(t) for t in args.temperatures.split(",")]
        rows, collected = [], {}
        with stack.running_lab(workdir, args.vllm_url, args.dtype) as lab:
            reference = ask(lab.base_url, stack.key("trusted"), questions)
            for temperature in temperatures:
                for client in args.clients.split(","):
                    got = (
                        reference
                        if (client, temperature) == ("trusted", 0.0)
                        else ask(
                            lab.base_url, stack.key(client), questions, temperature=temperature
                        )
                    )
                    name = client if temperature == 0 else f"{client}@T={temperature:g}"
                    collected[name] = got
                    rows.append(score(client, temperature, questions, got, reference))
                    print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        print(markdown(rows))
        picks = list(range(0, len(questions), max(1, len(questions) // 8)))[:8]
        print(side_by_side(questions, collected, picks))
        results["rows"] = [asdict(r) for r in rows]
        results["answers"] = {n: keep(got) for n, got in collected.items()}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
