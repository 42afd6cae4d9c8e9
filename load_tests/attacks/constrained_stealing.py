"""Logit stealing through constrained decoding: exact logit differences without ``logit_bias``.

    .venv/bin/python -m load_tests.attacks.constrained_stealing [--vllm-url URL]

vLLM applies a grammar's mask before it takes the logprobs, so under
``structured_outputs: {"regex": "(w|R)"}`` the returned values are a distribution over the
tokens that can start a match: ``w``, its prefixes that are tokens, and the reference ``R``.
A tier that returns a confident sampled token's value exact (``exact_sampled_above``) then
hands out one exact equation per query; with the prefixes already known (shorter tokens are
measured first) it gives ``logit(w) - logit(R)``:

- ``w`` sampled with value ``v``: ``e^-v = 1 + e^-x K`` (``K``: the known tokens' ``e^d``);
- a known token ``s`` sampled: ``e^x = e^(d_s - v) - K``.

A value on the tier's grid (0.5 on the default tier) is noised, so the attacker skips it;
a pair within about 2.2 nats is then asked again against the reference token it knows to be
farthest away. Each context's row is the logit differences of one token set (printable
single characters and multi-character tokens, > the hidden size), and the hidden size is
read off the spectrum as in ``logit_stealing``. The attacker stops at the first context
whose every query is refused.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter as Tally
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from load_tests.attacks.common import (
    Counter,
    Target,
    add_stack_arguments,
    completion_logprobs,
    completions,
    stack_from_args,
)
from load_tests.attacks.logit_stealing import (
    HEADER,
    Harvest,
    column_set,
    contexts,
    load_tokenizer,
    report,
    token_strings,
)

GRID = 0.5
"""The default tier's logprob grid: values on it were noised (the attacker reads it off)."""
_META = set("\\^$.|?*+()[]{}/-\"'")


def regex_literal(text: str) -> str:
    """``text`` as a regex matching itself."""
    return "".join("\\" + c if c in _META else c for c in text)


def constrained_columns(tokenizer: Tokenizer, size: int, seed: int) -> list[int]:
    """``size`` token ids: the printable one-character tokens, then multi-character tokens
    (shortest first) whose token prefixes are all in the set; the first is the reference."""
    strings = token_strings(tokenizer)
    clean = column_set(tokenizer, 0, seed)
    printable = [i for i in clean if strings[i].isascii() and strings[i].isprintable()]
    singles = [i for i in printable if len(strings[i]) == 1]
    chosen = list(singles)
    texts = {strings[i] for i in chosen}
    vocab = {strings[i] for i in clean}
    multi = sorted(
        (i for i in printable if len(strings[i]) > 1), key=lambda i: (len(strings[i]), i)
    )
    for i in multi:
        if len(chosen) >= size:
            break
        text = strings[i]
        if all(text[:n] in texts for n in range(1, len(text)) if text[:n] in vocab):
            chosen.append(i)
            texts.add(text)
    reference = next(i for i in singles if strings[i] == "Q")
    chosen.remove(reference)
    return [reference, *chosen[: size - 1]]


def starters(text: str, known: Sequence[str]) -> list[str]:
    """The tokens of ``known`` that can start a match of ``text`` (its token prefixes)."""
    return [t for t in known if text.startswith(t) and t != text]


def is_exact(value: float, grid: float = GRID) -> bool:
    """Off the tier's grid: the value came back as vLLM computed it."""
    return abs(value / grid - round(value / grid)) > 1e-6


def solve(sampled: str, value: float, target: str, others: dict[str, float]) -> float:
    """``logit(target) - logit(ref)`` from an exact value ``value`` of ``sampled``, given the
    differences ``others`` of the rest of the allowed set (NaN when unsolvable)."""
    k = sum(math.exp(d) for d in others.values())
    if sampled == target:
        rest = math.expm1(-value)
        return math.log(k) - math.log(rest) if rest > 0 else math.nan
    if sampled not in others:
        return math.nan
    e = math.exp(others[sampled] - value) - k
    return math.log(e) if e > 0 else math.nan


def _body(prompt: str, text: str, other: str) -> dict:
    regex = f"({regex_literal(text)}|{regex_literal(other)})"
    return {
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 1,
        "structured_outputs": {"regex": regex},
    }


def harvest_constrained(
    target: Target, prompts: Sequence[str], columns: Sequence[int], strings: list[str]
) -> Harvest:
    """Pass 1: every token against the reference; pass 2: the undecided ones against the
    known token farthest from the reference. Solved shortest token first."""
    counter = Counter()
    texts = [strings[c] for c in columns]
    matrix = np.full((len(prompts), len(columns)), np.nan)
    harvest = Harvest("constrained", target.label, matrix)
    tally: Tally[str] = Tally()

    def ask(plan: list[tuple[int, int, int]]) -> dict[tuple[int, int], tuple[str, float]]:
        bodies = [_body(prompts[i], texts[j], texts[r]) for i, j, r in plan]
        answers = {}
        for (i, j, _), response in zip(
            plan, completions(target, bodies, counter=counter), strict=True
        ):
            if response.ok:
                token, value, _ = completion_logprobs(response)[0]
                answers[(i, j)] = (token, value)
            else:
                tally[response.error] += 1
        return answers

    def fill(i: int, j: int, r: int, answer: tuple[str, float] | None) -> None:
        if answer is None or not is_exact(answer[1]):
            return
        row = {texts[c]: matrix[i, c] for c in range(len(texts)) if not np.isnan(matrix[i, c])}
        allowed = [*starters(texts[j], list(row)), texts[r]]
        if any(t not in row for t in allowed):
            return
        matrix[i, j] = solve(answer[0], answer[1], texts[j], {t: row[t] for t in allowed})

    order = sorted(range(1, len(columns)), key=lambda j: len(texts[j]))
    for i in range(len(prompts)):
        matrix[i, 0] = 0.0
    first = ask([(0, j, 0) for j in order])
    if not first:
        matrix[:] = np.nan  # the reference column's zeros were never returned
        harvest.queries = counter.sent
        harvest.refusals = tally
        return harvest
    rest = ask([(i, j, 0) for i in range(1, len(prompts)) for j in order])
    answers = {**first, **rest}
    for i in range(len(prompts)):
        for j in order:
            fill(i, j, 0, answers.get((i, j)))
    for _ in range(2):
        plan = []
        for i in range(len(prompts)):
            singles = [c for c in range(1, len(texts)) if len(texts[c]) == 1]
            known = [c for c in singles if not np.isnan(matrix[i, c])]
            if not known:
                continue
            far = max(known, key=lambda c: abs(matrix[i, c]))
            plan += [(i, j, far) for j in order if np.isnan(matrix[i, j]) and j != far]
        if not plan:
            break
        answers = ask(plan)
        for i, j, r in sorted(plan, key=lambda p: len(texts[p[1]])):
            fill(i, j, r, answers.get((i, j)))
    harvest.queries = counter.sent
    harvest.refusals = tally
    return harvest


def main(argv: list[str] | None = None) -> None:
    """Run the attack on the trusted and the default tier and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--contexts", type=int, default=160, help="logit vectors to build (> h)")
    ap.add_argument("--columns", type=int, default=160, help="tokens per vector (> h)")
    ap.add_argument("--tiers", default="trusted,default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    true_hidden = int(json.loads((args.model_dir / "config.json").read_text())["hidden_size"])
    tokenizer = load_tokenizer(args.model_dir)
    strings = token_strings(tokenizer)
    columns = constrained_columns(tokenizer, args.columns, args.seed)
    prompts = contexts(args.contexts, args.seed, tokenizer)
    reports = []
    with stack_from_args(args) as stack:
        targets = {"trusted": stack.trusted, "default": stack.default}
        for tier in args.tiers.split(","):
            harvest = harvest_constrained(targets[tier], prompts, columns, strings)
            reports.append(report(harvest))
            print(reports[-1].markdown(true_hidden), flush=True)
    print(
        f"\nteacher hidden size {true_hidden}; {len(prompts)} contexts x {len(columns)} token "
        "columns\n"
    )
    print(HEADER)
    for r in reports:
        print(r.markdown(true_hidden))
    if args.json is not None:
        rows = [
            {
                "tier": r.tier,
                "queries": r.queries,
                "coverage": r.coverage,
                "usable_vectors": r.estimate.vectors,
                "hidden_estimate": r.estimate.hidden,
                "refusal": r.refusal,
            }
            for r in reports
        ]
        args.json.write_text(json.dumps({"true_hidden": true_hidden, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
