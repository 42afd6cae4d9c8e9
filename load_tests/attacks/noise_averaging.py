"""Noise averaging: repeat one request R times and average the logprobs, hoping the noise cancels.

    .venv/bin/python -m load_tests.attacks.noise_averaging [--vllm-url URL] [--model-dir DIR]

Each prompt is asked R = 1..64 times (greedy, top-k logprobs); the attacker averages the
values of every (position, token) and compares them with the true logprobs (what the trusted
tier returns: vLLM's raw values). The guard's noise is a keyed function of (client, prompt,
position, token), so repeats return the same numbers and the error stays flat. For contrast,
two offline curves on the true values: i.i.d. Gaussian noise of the tier's scale drawn afresh
per request, and the tier's whole pipeline (noise, order, normalization, grid) with a fresh
key per request. A last table averages across the attacker's several default-tier keys,
which do get independent noise.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard_server.defences.logprobs import LogprobHardening
from guard_server.teacher import task
from load_tests.attacks.common import (
    Target,
    add_stack_arguments,
    completion_logprobs,
    completions,
    default_hardening,
    stack_from_args,
    tier_max_top,
)

REPEATS = (1, 2, 4, 8, 16, 32, 64)

Cell = tuple[int, int, str]
"""(prompt, position, token)."""


def prompts(n: int, seed: int) -> list[str]:
    """``n`` task questions (training split) as completion prompts."""
    return [task.completion_prompt(p.question) for p in task.make_problems(n, seed, "train")]


def _body(prompt: str, k: int, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": k}


def observe(
    target: Target, questions: Sequence[str], repeats: int, k: int, max_tokens: int
) -> list[list[dict[tuple[int, str], float]]]:
    """``[repeat][prompt] -> {(position, token): value}``: each prompt asked ``repeats`` times."""
    bodies = [_body(q, k, max_tokens) for _ in range(repeats) for q in questions]
    responses = completions(target, bodies)
    out: list[list[dict[tuple[int, str], float]]] = []
    for r in range(repeats):
        row = []
        for i in range(len(questions)):
            response = responses[r * len(questions) + i]
            if not response.ok:
                raise RuntimeError(f"{target.label}: {response.error}")
            values = {}
            for position, (token, value, top) in enumerate(completion_logprobs(response)):
                values[(position, token)] = value
                values.update({(position, t): v for t, v in top.items()})
            row.append(values)
        out.append(row)
    return out


def truth_of(trusted: list[dict[tuple[int, str], float]]) -> dict[Cell, float]:
    """The true logprob of every (prompt, position, token) the trusted tier returned."""
    return {(i, pos, tok): v for i, row in enumerate(trusted) for (pos, tok), v in row.items()}


def averaged_error(
    observed: list[list[dict[tuple[int, str], float]]], truth: dict[Cell, float], r: int
) -> float:
    """Mean absolute error (nats) of the average of the first ``r`` repeats, over every cell
    the attacker saw whose true value is known."""
    sums: dict[Cell, list[float]] = {}
    for repeat in observed[:r]:
        for i, row in enumerate(repeat):
            for (pos, tok), v in row.items():
                sums.setdefault((i, pos, tok), []).append(v)
    errors = [abs(np.mean(v) - truth[c]) for c, v in sums.items() if c in truth]
    return float(np.mean(errors))


def iid_curve(
    truth_cells: dict[Cell, float], sigma: float, repeats: Sequence[int], seed: int
) -> list[float]:
    """Offline: the error of averaging r draws of truth + N(0, sigma^2), fresh per request."""
    rng = np.random.default_rng(seed)
    cells = np.array([truth_cells[c] for c in sorted(truth_cells)])
    draws = cells[None, :] + sigma * rng.standard_normal((max(repeats), len(cells)))
    return [float(np.abs(draws[:r].mean(axis=0) - cells).mean()) for r in repeats]


def fresh_key_curve(
    seen: list[dict[tuple[int, str], float]],
    truth: dict[Cell, float],
    hardening: LogprobHardening,
    repeats: Sequence[int],
    seed: int,
) -> list[float]:
    """Offline: the tier's whole pipeline on the true values, with a fresh key per request.

    ``seen`` says which tokens the attacker gets at each position (the default tier's top-k).
    """
    rng = random.Random(f"fresh:{seed}")
    draws: list[dict[Cell, float]] = []
    for _ in range(max(repeats)):
        draw: dict[Cell, float] = {}
        for i, row in enumerate(seen):
            key = rng.randbytes(32)
            positions = sorted({pos for pos, _ in row})
            for pos in positions:
                tokens = [tok for p, tok in row if p == pos and (i, p, tok) in truth]
                true_values = [truth[(i, pos, t)] for t in tokens]
                greedy = max(range(len(tokens)), key=true_values.__getitem__)  # sampled token
                values = hardening.apply(key, pos, tokens, true_values, greedy)
                draw.update({(i, pos, t): v for t, v in zip(tokens, values, strict=True)})
        draws.append(draw)
    cells = sorted(draws[0])
    matrix = np.array([[d[c] for c in cells] for d in draws])
    true = np.array([truth[c] for c in cells])
    return [float(np.abs(matrix[:r].mean(axis=0) - true).mean()) for r in repeats]


@dataclass(frozen=True, slots=True)
class Result:
    """Error (nats) against R, per curve; multi-key error against the number of keys."""

    repeats: tuple[int, ...]
    curves: dict[str, list[float]]
    keys: list[float]
    cells: int
    queries: dict[str, int]


def run_attack(
    trusted: Target,
    default_keys: Sequence[Target],
    *,
    n_prompts: int,
    repeats: Sequence[int] = REPEATS,
    seed: int = 0,
    max_tokens: int = 16,
    hardening: LogprobHardening | None = None,
    k: int | None = None,
) -> Result:
    """Both tiers at the same budget (prompts x max R requests each), plus the offline curves."""
    hardening = hardening or default_hardening()
    k = k or tier_max_top()
    questions = prompts(n_prompts, seed)
    top = max(repeats)
    trusted_obs = observe(trusted, questions, top, 20, max_tokens)
    truth = truth_of(trusted_obs[0])
    default_obs = observe(default_keys[0], questions, top, k, max_tokens)
    seen_cells = {(i, pos, tok) for i, row in enumerate(default_obs[0]) for pos, tok in row}
    seen_truth = {c: truth[c] for c in seen_cells if c in truth}
    curves = {
        "trusted": [averaged_error(trusted_obs, truth, r) for r in repeats],
        "default (keyed noise)": [averaged_error(default_obs, truth, r) for r in repeats],
        f"i.i.d. N(0, {hardening.noise_scale:g}²), offline": iid_curve(
            seen_truth, hardening.noise_scale, repeats, seed
        ),
        "tier pipeline, fresh key per request, offline": fresh_key_curve(
            default_obs[0], truth, hardening, repeats, seed
        ),
    }
    per_key = [default_obs[0]] + [
        observe(t, questions, 1, k, max_tokens)[0] for t in default_keys[1:]
    ]
    keys = [averaged_error(per_key[:n], truth, n) for n in range(1, len(per_key) + 1)]
    queries = {
        "trusted": top * len(questions),
        "default": top * len(questions) + (len(default_keys) - 1) * len(questions),
    }
    return Result(tuple(repeats), curves, keys, len(seen_truth), queries)


def markdown(result: Result) -> str:
    """The two tables."""
    names = list(result.curves)
    lines = [
        "| R | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for j, r in enumerate(result.repeats):
        lines.append(f"| {r} | " + " | ".join(f"{result.curves[n][j]:.3f}" for n in names) + " |")
    lines += [
        "",
        "| default-tier keys averaged (R = 1 each) | error (nats) |",
        "|---:|---:|",
    ]
    lines += [f"| {n} | {e:.3f} |" for n, e in enumerate(result.keys, start=1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the attack on both tiers and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-repeats", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    repeats = [r for r in REPEATS if r <= args.max_repeats]
    with stack_from_args(args) as stack:
        result = run_attack(
            stack.trusted, stack.default_keys(), n_prompts=args.prompts, repeats=repeats,
            seed=args.seed,
        )  # fmt: skip
    print(
        f"\n{args.prompts} prompts, greedy, {result.cells} (position, token) cells; mean "
        f"absolute error of the averaged logprobs against the true ones (nats); queries "
        f"{result.queries}\n"
    )
    print(markdown(result))
    if args.json is not None:
        payload = {
            "repeats": result.repeats,
            "curves": result.curves,
            "keys": result.keys,
            "cells": result.cells,
            "queries": result.queries,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    if not math.isfinite(result.curves["default (keyed noise)"][0]):
        raise SystemExit("no cells compared")


if __name__ == "__main__":
    main()
