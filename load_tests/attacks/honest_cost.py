"""Honest cost of logprob hardening: answer accuracy and calibration of the returned logprobs.

    .venv/bin/python -m load_tests.attacks.honest_cost [--vllm-url URL] [--model-dir DIR]

An honest client asks held-out questions (greedy, ``logprobs`` 5) and uses the returned
logprobs of the answer's digit tokens as the model's confidence. Per tier: the accuracy of
the answers as received, and how well the confidences are calibrated: expected calibration
error (10 equal-width bins) and Brier score, per answer (confidence = exp of the summed
logprobs of its digits, correct = the whole sum right) and per digit token (confidence = exp
of its logprob, correct = the digit matches the true sum's digit at that place).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from guard_server.teacher import task
from load_tests.attacks.common import (
    Target,
    add_stack_arguments,
    completion_logprobs,
    completions,
    stack_from_args,
)


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error with equal-width bins."""
    conf, hit = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(conf[members].mean() - hit[members].mean())
    return float(total)


def brier(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    """Mean squared difference between confidence and outcome."""
    conf, hit = np.asarray(confidence, float), np.asarray(correct, float)
    return float(np.mean((conf - hit) ** 2))


def answer_digits(positions: list[tuple[str, float, dict[str, float]]]) -> list[tuple[str, float]]:
    """The (digit, logprob) tokens of the answer: the last run of digit tokens."""
    out: list[tuple[str, float]] = []
    for token, value, _ in reversed(positions):
        if token.isdigit():
            out.append((token, value))
        elif out:
            break
    return out[::-1]


@dataclass(frozen=True, slots=True)
class TierCost:
    """What an honest client of one tier gets."""

    tier: str
    accuracy: float
    answer_ece: float
    answer_brier: float
    digit_ece: float
    digit_brier: float
    mean_confidence: float
    answers: int


def measure(target: Target, problems: Sequence[task.Problem], temperature: float) -> TierCost:
    """Ask every problem once and score the answers and their returned confidences."""
    bodies = [
        {
            "prompt": task.completion_prompt(p.question),
            "max_tokens": 32,
            "temperature": temperature,
            "logprobs": 5,
            "seed": i,
        }
        for i, p in enumerate(problems)
    ]
    responses = completions(target, bodies)
    correct, answer_conf, answer_hit, digit_conf, digit_hit = 0, [], [], [], []
    for problem, response in zip(problems, responses, strict=True):
        if not response.ok:
            raise RuntimeError(f"{target.label}: {response.error}")
        text = response.body["choices"][0]["text"]
        right = task.check(problem, text)
        correct += right
        digits = answer_digits(completion_logprobs(response))
        if not digits:
            answer_conf.append(0.0)
            answer_hit.append(False)
            continue
        answer_conf.append(float(np.exp(sum(v for _, v in digits))))
        answer_hit.append(right)
        for place, (digit, value) in enumerate(digits):
            digit_conf.append(float(np.exp(value)))
            digit_hit.append(place < len(problem.answer) and problem.answer[place] == digit)
    return TierCost(
        target.label,
        correct / len(problems),
        ece(answer_conf, answer_hit),
        brier(answer_conf, answer_hit),
        ece(digit_conf, digit_hit),
        brier(digit_conf, digit_hit),
        float(np.mean(answer_conf)),
        len(problems),
    )


def markdown(costs: Sequence[TierCost]) -> str:
    """The results table."""
    lines = [
        "| tier | answer accuracy | answer ECE | answer Brier | digit ECE | digit Brier "
        "| mean answer confidence |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {c.tier} | {c.accuracy:.1%} | {c.answer_ece:.3f} | {c.answer_brier:.3f} "
        f"| {c.digit_ece:.3f} | {c.digit_brier:.3f} | {c.mean_confidence:.3f} |"
        for c in costs
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure both tiers and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--n", type=int, default=1000, help="held-out questions")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    problems = task.make_problems(args.n, seed=1, split="heldout")
    with stack_from_args(args) as stack:
        costs = [measure(t, problems, args.temperature) for t in (stack.trusted, stack.default)]
    print(
        f"\n{args.n} held-out questions, temperature {args.temperature:g}, logprobs 5; "
        "confidence = exp(returned logprob)\n"
    )
    print(markdown(costs))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(c) for c in costs], indent=2))


if __name__ == "__main__":
    main()
