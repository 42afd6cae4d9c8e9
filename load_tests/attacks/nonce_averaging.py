"""Nonce averaging: R variants of one request that the model reads alike, averaged.

    .venv/bin/python -m load_tests.attacks.nonce_averaging [--vllm-url URL] [--guard-checkout DIR]

The plain averaging attack (``noise_averaging``) repeats one request and gets the same noise
back each time. This attacker varies bytes the model never sees, so that a guard keyed on the
request's bytes draws fresh noise per variant, and averages the R answers. Each variant
family changes one thing, variant r = 0 .. R-1 of a chat request asking one task question
(greedy, the tier's top logprobs):

``nonce key``     an extra key inside the user message (``"nonce": "r"``): vLLM drops it
``message name``  ``"name": "u<r>"`` on the user message (a template that does not render it)
``user field``    ``"user": "u<r>"``: an output-only field
``seed``          ``"seed": r``: no effect on a greedy answer
``stop string``   ``"stop": ["<r-th string that never occurs>"]``
``key order``     the body's keys (and the message's) in the r-th order
``json spacing``  the same body with r spaces after every separator

The error is the mean absolute difference (nats) between the average of the first R
variants' values and the true logprobs (the trusted tier's), over every (prompt, position,
token) the attacker saw. A guard whose noise derives from the model input answers every
variant of a prompt with the same numbers: the error stays flat in R. A family the guard
refuses is reported with its refusal.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard_server.teacher import task
from load_tests.attacks.common import (
    MODEL,
    Target,
    add_stack_arguments,
    chat_completions,
    chat_logprobs,
    stack_from_args,
    tier_max_top,
)
from load_tests.attacks.noise_averaging import REPEATS, averaged_error, truth_of

Variant = Callable[[dict[str, Any], int], dict[str, Any] | bytes]
"""Variant r of a request body (a dict, or the exact bytes to send)."""


def _nonce_key(body: dict[str, Any], r: int) -> dict[str, Any]:
    message = {**body["messages"][-1], "nonce": str(r)}
    return {**body, "messages": [*body["messages"][:-1], message]}


def _message_name(body: dict[str, Any], r: int) -> dict[str, Any]:
    message = {**body["messages"][-1], "name": f"u{r}"}
    return {**body, "messages": [*body["messages"][:-1], message]}


def _user_field(body: dict[str, Any], r: int) -> dict[str, Any]:
    return {**body, "user": f"u{r}"}


def _seed(body: dict[str, Any], r: int) -> dict[str, Any]:
    return {**body, "seed": r}


def _stop_string(body: dict[str, Any], r: int) -> dict[str, Any]:
    return {**body, "stop": [f"\u2603{r}\u2603"]}


def _reordered(mapping: dict[str, Any], r: int) -> dict[str, Any]:
    order = next(itertools.islice(itertools.permutations(sorted(mapping)), r, None))
    return {k: mapping[k] for k in order}


def _key_order(body: dict[str, Any], r: int) -> bytes:
    messages = [_reordered(m, r % 2) for m in body["messages"]]
    return json.dumps(_reordered({**body, "messages": messages}, r)).encode()


def _json_spacing(body: dict[str, Any], r: int) -> bytes:
    return json.dumps(body, separators=("," + " " * r, ":" + " " * r)).encode()


FAMILIES: dict[str, Variant] = {
    "nonce key": _nonce_key,
    "message name": _message_name,
    "user field": _user_field,
    "seed": _seed,
    "stop string": _stop_string,
    "key order": _key_order,
    "json spacing": _json_spacing,
}


def questions(n: int, seed: int) -> list[str]:
    """``n`` task questions (training split), asked as single-turn chats."""
    return [p.question for p in task.make_problems(n, seed, "train")]


def base_body(question: str, k: int, max_tokens: int) -> dict[str, Any]:
    """The plain request every variant derives from."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": k,
    }


@dataclass(slots=True)
class Observed:
    """``values[variant][prompt] -> {(position, token): value}``; refusals by message."""

    values: list[list[dict[tuple[int, str], float]]]
    refusals: Tally[str] = field(default_factory=Tally)
    queries: int = 0


def observe(
    target: Target,
    prompts: Sequence[str],
    variant: Variant,
    repeats: int,
    k: int,
    max_tokens: int,
) -> Observed:
    """Send variants 0 .. ``repeats``-1 of each prompt's request; keep the answered ones."""
    bodies = [variant(base_body(q, k, max_tokens), r) for r in range(repeats) for q in prompts]
    responses = chat_completions(target, bodies)
    observed = Observed([], queries=len(bodies))
    for r in range(repeats):
        row = []
        for i in range(len(prompts)):
            response = responses[r * len(prompts) + i]
            values: dict[tuple[int, str], float] = {}
            if response.ok:
                for position, (token, value, top) in enumerate(chat_logprobs(response)):
                    values[(position, token)] = value
                    values.update({(position, t): v for t, v in top.items()})
            else:
                observed.refusals[response.error] += 1
            row.append(values)
        observed.values.append(row)
    return observed


@dataclass(frozen=True, slots=True)
class FamilyResult:
    """One variant family: error (nats) against R, or the refusal that stopped it."""

    family: str
    errors: list[float | None]
    refusal: str
    queries: int


@dataclass(frozen=True, slots=True)
class Result:
    repeats: tuple[int, ...]
    families: list[FamilyResult]
    trusted_error: float
    cells: int


def run_attack(
    trusted: Target,
    default: Target,
    *,
    n_prompts: int,
    repeats: Sequence[int] = REPEATS,
    families: Sequence[str] = tuple(FAMILIES),
    seed: int = 0,
    max_tokens: int = 16,
    k: int | None = None,
) -> Result:
    """Every family against ``default``; the truth from ``trusted`` (one plain request each).

    An error is ``None`` at an R where some variant of the first R was refused."""
    k = k or tier_max_top()
    prompts = questions(n_prompts, seed)
    plain = observe(trusted, prompts, lambda body, _: body, 1, 20, max_tokens)
    if plain.refusals:
        raise RuntimeError(f"trusted tier refused: {plain.refusals.most_common(1)[0][0]}")
    truth = truth_of(plain.values[0])
    out = []
    cells: set[tuple[int, int, str]] = set()
    for name in families:
        observed = observe(default, prompts, FAMILIES[name], max(repeats), k, max_tokens)
        answered = [all(row) for row in observed.values]  # every prompt of the variant
        errors = [
            averaged_error(observed.values, truth, r) if all(answered[:r]) else None
            for r in repeats
        ]
        for row in observed.values:
            cells |= {(i, p, t) for i, v in enumerate(row) for p, t in v if (i, p, t) in truth}
        refusal = ""
        if observed.refusals:
            text, count = observed.refusals.most_common(1)[0]
            refusal = f"{count:,}x {text}"
        out.append(FamilyResult(name, errors, refusal, observed.queries))
        print(f"{name}: {errors} {refusal}", flush=True)
    trusted_error = averaged_error(plain.values, truth, 1)
    return Result(tuple(repeats), out, trusted_error, len(cells))


def markdown(result: Result) -> str:
    """Error against R, one column per family (refused families: their refusal)."""
    names = [f.family for f in result.families]
    lines = ["| R | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for j, r in enumerate(result.repeats):
        cells = []
        for family in result.families:
            error = family.errors[j]
            cells.append("refused" if error is None else f"{error:.3f}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    refused = [f for f in result.families if f.refusal]
    if refused:
        lines.append("")
        lines += [f"- {f.family}: {f.refusal}" for f in refused]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every family against the default tier and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-repeats", type=int, default=64)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    repeats = [r for r in REPEATS if r <= args.max_repeats]
    families = [f for f in args.families.split(",") if f]
    with stack_from_args(args) as stack:
        result = run_attack(
            stack.trusted, stack.default, n_prompts=args.prompts, repeats=repeats,
            families=families, seed=args.seed,
        )  # fmt: skip
    print(
        f"\n{args.prompts} prompts, greedy chat, {result.cells} (position, token) cells; mean "
        "absolute error (nats) of the average of R variants against the true logprobs "
        f"(trusted tier: {result.trusted_error:.3f})\n"
    )
    print(markdown(result))
    if args.json is not None:
        payload = {
            "repeats": result.repeats,
            "families": [
                {"family": f.family, "errors": f.errors, "refusal": f.refusal, "queries": f.queries}
                for f in result.families
            ],
            "cells": result.cells,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
