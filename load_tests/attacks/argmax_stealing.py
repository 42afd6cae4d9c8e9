"""Logprob-free logit stealing: binary search on a clamped logit_bias, reading only the argmax.

    .venv/bin/python -m load_tests.attacks.argmax_stealing [--vllm-url URL] [--model-dir DIR]

What the default tier still allows: ``logit_bias`` (at most 10 entries, |bias| <= 5) without
logprobs, and greedy decoding. Lower the context's 9 most likely tokens by 5, bias one more
token t by b, and ask for one greedy token: t comes out iff ``z_t + b`` beats every other
logit, so a binary search on b in [-5, 5] measures ``z_t - M`` (M: the highest logit left
after lowering, the same for every t outside the 9) to 10 / 2^steps nats, for the tokens
within reach. Rows of such differences have the same rank h as full logit vectors.

Running the ~10^5-10^6 requests through CPU vLLM is out of reach here, so the search is
emulated offline: a greedy token is a pure function of the logits and the bias, and exact
logits come from the trusted tier (``logprob_token_ids``, 4 requests a context). The emulated
oracle is checked against the real default tier on a sample of biased greedy requests
before it is used. The attacker is granted the identity of each context's 9 most likely
tokens for free (finding them costs 9 more argmax requests a context).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from load_tests.attacks.common import (
    Target,
    add_stack_arguments,
    completions,
    stack_from_args,
    tier_bias_limit,
)
from load_tests.attacks.logit_stealing import (
    Estimate,
    column_set,
    contexts,
    estimate_hidden,
    harvest_token_ids,
    load_tokenizer,
    token_strings,
)


def exact_logprobs(target: Target, prompts: Sequence[str], vocab: int) -> np.ndarray:
    """Every token's logprob at every context (trusted tier, ``logprob_token_ids``)."""
    return harvest_token_ids(target, prompts, list(range(vocab))).matrix


def greedy_token(row: np.ndarray, bias: dict[int, float]) -> int:
    """The greedy token vLLM picks: argmax of logits plus bias (logprobs differ by a constant)."""
    biased = row.copy()
    for token, value in bias.items():
        biased[token] += value
    return int(np.argmax(biased))


def verify_oracle(
    target: Target,
    prompts: Sequence[str],
    exact: np.ndarray,
    strings: list[str],
    limit: tuple[int, float],
    samples: int,
    seed: int = 0,
) -> tuple[int, int]:
    """Send ``samples`` random clamped-bias greedy requests; count (agree, compared)."""
    rng = random.Random(f"oracle:{seed}")
    entries, cap = limit
    cases = []
    for _ in range(samples):
        i = rng.randrange(len(prompts))
        top = list(np.argsort(-exact[i])[: entries - 1])
        target_token = rng.randrange(exact.shape[1])
        bias = {int(t): -cap for t in top if t != target_token}
        bias[target_token] = round(rng.uniform(-cap, cap), 4)
        cases.append((i, bias))
    bodies = [
        {
            "prompt": prompts[i],
            "max_tokens": 1,
            "temperature": 0,
            "logit_bias": {str(t): b for t, b in bias.items()},
        }
        for i, bias in cases
    ]
    agree = compared = 0
    for (i, bias), response in zip(cases, completions(target, bodies), strict=True):
        if not response.ok:
            raise RuntimeError(f"{target.label}: {response.error}")
        expected = strings[greedy_token(exact[i], bias)]
        if expected and "\ufffd" not in expected:
            compared += 1
            agree += response.body["choices"][0]["text"] == expected
    return agree, compared


@dataclass(frozen=True, slots=True)
class ArgmaxResult:
    """The emulated attack: what it measured, at what cost, and the estimate."""

    candidates: int
    contexts: int
    columns: int
    queries: int
    max_error: float
    estimate: Estimate


def emulate(
    exact: np.ndarray,
    columns: Sequence[int],
    limit: tuple[int, float],
    steps: int = 16,
) -> ArgmaxResult:
    """Run the bias binary search against the emulated greedy oracle; SVD what it measured.

    The query count includes one screening request per candidate context (how flat it is
    shows in its top-k logprobs, which the default tier returns).
    """
    entries, cap = limit
    cols = np.asarray(columns)
    measured = np.full((exact.shape[0], len(cols)), np.nan)
    references = np.zeros(exact.shape[0])
    queries = exact.shape[0]  # screening
    for i, row in enumerate(exact):
        # The 9 most likely tokens get -cap; the 10th (the best of the rest) is not measured,
        # so every measured t meets the same rival M (vectorised greedy oracle below).
        order = np.argsort(-row)
        lowered, tenth = order[: entries - 1], order[entries - 1]
        rival = max(row[lowered].max() - cap, row[tenth])
        references[i] = rival
        queries += entries  # finding the 9 tokens and the 10th
        live = ~np.isin(cols, order[:entries])
        z = row[cols[live]]
        queries += int(live.sum())  # can bias +cap make t the greedy token at all?
        reach = z + cap > rival
        low = np.full(z.shape, -cap)
        high = np.full(z.shape, cap)
        for _ in range(steps):
            mid = (low + high) / 2
            wins = z + mid > rival  # the greedy token is t
            high = np.where(wins, mid, high)
            low = np.where(wins, low, mid)
        queries += steps * int(reach.sum())
        values = np.where(reach, -(low + high) / 2, np.nan)  # z_t - M
        measured[i, np.flatnonzero(live)] = values
    # The attacker keeps the most reachable contexts; the columns measured in all of them
    # form the matrix. Keep the number of contexts that makes the smaller side largest.
    order = np.argsort(-(~np.isnan(measured)).sum(axis=1))
    best, kept = 0, []
    for n in range(1, len(order) + 1):
        common_n = int((~np.isnan(measured[order[:n]])).all(axis=0).sum())
        if min(n, common_n) > best:
            best, kept = min(n, common_n), [int(i) for i in order[:n]]
    common = ~np.isnan(measured[kept]).any(axis=0) if kept else np.zeros(len(cols), bool)
    matrix = measured[np.ix_(kept, np.flatnonzero(common))]
    truth = exact[kept][:, list(np.asarray(columns)[common])] - references[kept, None]
    max_error = float(np.abs(matrix - truth).max()) if matrix.size else float("nan")
    return ArgmaxResult(
        exact.shape[0], len(kept), int(common.sum()), queries, max_error, estimate_hidden(matrix)
    )


def main(argv: list[str] | None = None) -> None:
    """Exact logits from the trusted tier, the oracle checked on the default tier, emulate."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--candidates", type=int, default=6000, help="contexts to choose from")
    ap.add_argument("--columns", type=int, default=0, help="token columns (0 = all clean)")
    ap.add_argument("--steps", type=int, default=16, help="binary-search steps per logit")
    ap.add_argument("--verify", type=int, default=200, help="real requests to check the oracle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    tokenizer: Tokenizer = load_tokenizer(args.model_dir)
    true_hidden = int(json.loads((args.model_dir / "config.json").read_text())["hidden_size"])
    prompts = contexts(args.candidates, args.seed, tokenizer, kinds=("random",))
    columns = column_set(tokenizer, args.columns, args.seed)
    limit = tier_bias_limit()
    with stack_from_args(args) as stack:
        exact = exact_logprobs(stack.trusted, prompts, tokenizer.get_vocab_size())
        agree, compared = verify_oracle(
            stack.default, prompts, exact, token_strings(tokenizer), limit, args.verify, args.seed
        )
    result = emulate(exact, columns, limit, args.steps)
    h = result.estimate.hidden
    print(
        f"\noracle check on the default tier: {agree}/{compared} biased greedy requests gave the "
        f"emulated token\n\n| candidates | contexts used | common columns | emulated queries "
        f"| max error (nats) | hidden size estimate |\n|---:|---:|---:|---:|---:|---|\n"
        f"| {result.candidates} | {result.contexts} | {result.columns} | {result.queries:,} "
        f"| {result.max_error:.1e} | {h if h is not None else 'no usable vectors'} "
        f"(true {true_hidden}) |"
    )
    if args.json is not None:
        payload = {
            "oracle": [agree, compared],
            "candidates": result.candidates,
            "contexts": result.contexts,
            "columns": result.columns,
            "queries": result.queries,
            "max_error": result.max_error,
            "hidden_estimate": h,
            "true_hidden": true_hidden,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
