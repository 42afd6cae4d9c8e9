"""Logit stealing (Carlini et al. 2024): rebuild logit vectors, read the hidden size off their SVD.

    .venv/bin/python -m load_tests.attacks.logit_stealing [--vllm-url URL] [--model-dir DIR]

The final layer maps a hidden state of size h to V logits, so logit vectors of n > h contexts,
stacked, have rank h: the singular values fall off a cliff after index h. The attack needs
the logits of one common set of tokens (any set larger than h) at each context. It tries,
per tier and at the same query budget, every way the API might give them:

``topk``           top-k logprobs, no bias: only the k most likely tokens of each context.
``carlini-topk``   the paper's recipe: bias a block of k-1 tokens and a reference token by
                   +100 so they enter the top-k, read differences to the reference
                   (|S|/(k-1) queries per vector). Works only if the returned logprobs
                   include the bias; vLLM returns raw (pre-bias) logprobs by default.
``forced-sample``  logit_bias +100 on one token at temperature 0 forces it to be sampled,
                   and its own raw logprob comes back: one new value per query.
``token-ids``      vLLM's ``logprob_token_ids``: the logprobs of 128 chosen tokens a query.

Each method gives a contexts x tokens matrix (missing values where the API gave none);
only complete rows are usable. The hidden size estimate is the index of the largest gap
between consecutive log singular values of the row-centred matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from guard_server.defences.keys import client_key, identity_key
from guard_server.defences.logprobs import LogprobHardening
from guard_server.teacher import task
from load_tests.attacks.common import (
    POLICY_FILE,
    Counter,
    Target,
    add_stack_arguments,
    completion_logprobs,
    completions,
    default_hardening,
    stack_from_args,
    tier_bias_limit,
    tier_max_top,
)

BIAS = 100.0
"""The largest bias OpenAI's API (and vLLM) accept."""
TOKEN_IDS_PER_QUERY = 128
"""vLLM's limit on ``logprob_token_ids``."""
METHODS = ("topk", "carlini-topk", "forced-sample", "token-ids")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The teacher's tokenizer (the attacker's choice too)."""
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def token_strings(tokenizer: Tokenizer) -> list[str]:
    """How the API writes each token id (its text alone)."""
    size = tokenizer.get_vocab_size()
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(size)]


def column_set(tokenizer: Tokenizer, size: int, seed: int) -> list[int]:
    """``size`` token ids (0 = all) whose text is unambiguous, so answers can be matched.

    Special tokens and tokens that share their text with another (partial UTF-8 bytes) are
    left out: any set larger than the hidden size serves the rank argument.
    """
    strings = token_strings(tokenizer)
    counts = Tally(strings)
    special = {tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "<unk>")}
    clean = [
        i
        for i, s in enumerate(strings)
        if i not in special and counts[s] == 1 and s and "\ufffd" not in s
    ]
    if size <= 0 or size >= len(clean):
        return clean
    return sorted(random.Random(f"columns:{seed}").sample(clean, size))


def contexts(
    n: int, seed: int, tokenizer: Tokenizer, kinds: Sequence[str] = ("task", "random")
) -> list[str]:
    """``n`` diverse prompts, alternating ``kinds``: ``task`` (a question plus part of an
    answer) and ``random`` (3-24 random tokens with whole-character texts: partial UTF-8
    bytes make vLLM's detokenizer repeat prompt text in the answer).

    Diversity matters: the hidden states at one fixed spot of one template span few
    directions, and the spectrum then hides its true rank behind a smooth decay.
    """
    mix = "" if tuple(kinds) == ("task", "random") else ":" + ",".join(kinds)
    rng = random.Random(f"contexts:{seed}{mix}")
    clean = column_set(tokenizer, 0, seed)
    out: list[str] = []
    for i in range(n):
        if kinds[i % len(kinds)] == "task":
            problem = task.sample_problem(rng, "train")
            answer = task.render_answer(problem, rng)
            cut = rng.randint(0, len(answer))
            out.append(task.completion_prompt(problem.question) + " " + answer[:cut])
        else:
            ids = [rng.choice(clean) for _ in range(rng.randint(3, 24))]
            out.append(tokenizer.decode(ids))
    return out


@dataclass(slots=True)
class Harvest:
    """What one method collected: a contexts x columns matrix (NaN where nothing came back)."""

    method: str
    tier: str
    matrix: np.ndarray
    queries: int = 0
    refusals: Tally[str] = field(default_factory=Tally)

    @property
    def usable(self) -> np.ndarray:
        """The complete rows."""
        return self.matrix[~np.isnan(self.matrix).any(axis=1)]

    def coverage(self) -> float:
        """Share of matrix entries that were recovered."""
        return float((~np.isnan(self.matrix)).mean())


def _refusals(responses: Sequence, tally: Tally[str]) -> None:
    for r in responses:
        if not r.ok:
            tally[r.error] += 1


def harvest_topk(
    target: Target, prompts: Sequence[str], columns: Sequence[int], strings: list[str], k: int
) -> Harvest:
    """Plain top-k logprobs at each context: no bias, one query each."""
    counter = Counter()
    index = {strings[c]: j for j, c in enumerate(columns)}
    bodies = [{"prompt": p, "max_tokens": 1, "temperature": 0, "logprobs": k} for p in prompts]
    responses = completions(target, bodies, counter=counter)
    matrix = np.full((len(prompts), len(columns)), np.nan)
    for i, r in enumerate(responses):
        if r.ok:
            for token, value in completion_logprobs(r)[0][2].items():
                if token in index:
                    matrix[i, index[token]] = value
    harvest = Harvest("topk", target.label, matrix, counter.sent)
    _refusals(responses, harvest.refusals)
    return harvest


def harvest_carlini(
    target: Target, prompts: Sequence[str], columns: Sequence[int], strings: list[str], k: int
) -> Harvest:
    """The paper's recipe: reference token + a block of k-1 tokens, all biased by +100.

    If the bias reached the returned logprobs, the k biased tokens would be the top-k and
    ``logprob(token) - logprob(reference)`` would be the exact logit difference. Entries are
    filled only for block tokens that come back alongside the reference.
    """
    counter = Counter()
    reference, rest = columns[0], list(columns[1:])
    blocks = [rest[j : j + k - 1] for j in range(0, len(rest), k - 1)]
    bodies = [
        {
            "prompt": p,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": k,
            "logit_bias": {str(t): BIAS for t in (reference, *block)},
        }
        for p in prompts
        for block in blocks
    ]
    responses = completions(target, bodies, counter=counter)
    position = {c: j for j, c in enumerate(columns)}
    matrix = np.full((len(prompts), len(columns)), np.nan)
    for q, r in enumerate(responses):
        if not r.ok:
            continue
        i, block = divmod(q, len(blocks))
        top = completion_logprobs(r)[0][2]
        ref_value = top.get(strings[reference])
        if ref_value is None:
            continue
        matrix[i, 0] = 0.0
        for t in blocks[block]:
            if strings[t] in top:
                matrix[i, position[t]] = top[strings[t]] - ref_value
    harvest = Harvest("carlini-topk", target.label, matrix, counter.sent)
    _refusals(responses, harvest.refusals)
    return harvest


def harvest_forced(
    target: Target, prompts: Sequence[str], columns: Sequence[int], strings: list[str], k: int
) -> Harvest:
    """One unbiased top-k query per context, then one forced sample per still-missing token."""
    topk = harvest_topk(target, prompts, columns, strings, k)
    matrix = topk.matrix.copy()
    plan = [(i, j) for i in range(len(prompts)) for j in range(len(columns))]
    plan = [(i, j) for i, j in plan if np.isnan(matrix[i, j])]
    bodies = [
        {
            "prompt": prompts[i],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,
            "logit_bias": {str(columns[j]): BIAS},
        }
        for i, j in plan
    ]
    counter = Counter()
    responses = completions(target, bodies, counter=counter)
    for (i, j), r in zip(plan, responses, strict=True):
        if r.ok:
            token, value, _ = completion_logprobs(r)[0]
            if token == strings[columns[j]]:
                matrix[i, j] = value
    harvest = Harvest("forced-sample", target.label, matrix, topk.queries + counter.sent)
    harvest.refusals = topk.refusals
    _refusals(responses, harvest.refusals)
    return harvest


def harvest_token_ids(target: Target, prompts: Sequence[str], columns: Sequence[int]) -> Harvest:
    """``logprob_token_ids`` in chunks of 128 (ids come back as ``token_id:N``)."""
    counter = Counter()
    chunks = [list(columns[j : j + TOKEN_IDS_PER_QUERY]) for j in range(0, len(columns), 128)]
    bodies = [
        {
            "prompt": p,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,
            "logprob_token_ids": chunk,
            "return_tokens_as_token_ids": True,
        }
        for p in prompts
        for chunk in chunks
    ]
    responses = completions(target, bodies, counter=counter)
    position = {c: j for j, c in enumerate(columns)}
    matrix = np.full((len(prompts), len(columns)), np.nan)
    for q, r in enumerate(responses):
        if not r.ok:
            continue
        i = q // len(chunks)
        for token, value in completion_logprobs(r)[0][2].items():
            tid = int(token.removeprefix("token_id:"))
            if tid in position:
                matrix[i, position[tid]] = value
    harvest = Harvest("token-ids", target.label, matrix, counter.sent)
    _refusals(responses, harvest.refusals)
    return harvest


@dataclass(frozen=True, slots=True)
class Estimate:
    """The hidden size read off a spectrum (None: fewer than two usable vectors)."""

    vectors: int
    hidden: int | None
    gap: float
    singular: tuple[float, ...]


def estimate_hidden(rows: np.ndarray) -> Estimate:
    """Largest log-gap of the singular values of the row-centred matrix (index, 1-based)."""
    if rows.shape[0] < 2:
        return Estimate(rows.shape[0], None, math.nan, ())
    centred = rows - rows.mean(axis=1, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    s = s[s > s[0] * 1e-12]
    if len(s) < 2:
        return Estimate(rows.shape[0], 1, math.nan, tuple(float(x) for x in s))
    gaps = np.log(s[:-1]) - np.log(s[1:])
    best = int(np.argmax(gaps))
    return Estimate(rows.shape[0], best + 1, float(gaps[best]), tuple(float(x) for x in s))


def hardened_what_if(
    truth: np.ndarray,
    prompts: Sequence[str],
    columns: Sequence[int],
    hardening: LogprobHardening,
    k: int,
    seed: int = 0,
) -> np.ndarray:
    """Forced-sample values as a tier with ``hardening`` would return them, were bias allowed.

    ``truth`` holds the exact logprobs (all columns). Each forced query's answer is the
    context's top-k plus the forced token, hardened together under the tier's keyed noise,
    exactly as the guard's transform does; the forced token's hardened value is kept.
    """
    base = client_key(f"what-if:{seed}".encode().ljust(32, b"\0"), "logprob-noise", "attacker")
    out = np.full_like(truth, np.nan)
    for i, prompt in enumerate(prompts):
        key = identity_key(base, prompt.encode())
        order = np.argsort(-truth[i])[:k]
        for j in range(len(columns)):
            picked = list(dict.fromkeys([*order.tolist(), j]))
            tokens = [str(columns[c]) for c in picked]
            forced = picked.index(j)  # the forced token is the sampled one
            values = hardening.apply(key, 0, tokens, [float(truth[i, c]) for c in picked], forced)
            out[i, j] = values[forced]
    return out


@dataclass(slots=True)
class Report:
    """One row of the results table."""

    tier: str
    method: str
    queries: int
    coverage: float
    estimate: Estimate
    refusal: str

    def markdown(self, true_hidden: int | None) -> str:
        """The table row."""
        h = self.estimate.hidden
        if h is None:
            figure = "no usable vectors"
        elif true_hidden:
            figure = f"**{h}** (off by {abs(h - true_hidden) / true_hidden:.0%})"
        else:
            figure = f"**{h}**"
        return (
            f"| {self.tier} | {self.method} | {self.queries:,} | {self.coverage:.1%} | "
            f"{self.estimate.vectors} | {figure} | {self.refusal or '—'} |"
        )


def report(harvest: Harvest) -> Report:
    """Summarise one harvest."""
    refusal = ""
    if harvest.refusals:
        text, count = harvest.refusals.most_common(1)[0]
        refusal = f"{count:,}x {text}"
    return Report(
        harvest.tier,
        harvest.method,
        harvest.queries,
        harvest.coverage(),
        estimate_hidden(harvest.usable),
        refusal,
    )


HEADER = (
    "| tier | method | queries | entries recovered | usable vectors | hidden size estimate "
    "| refusals |\n|---|---|---:|---:|---:|---|---|"
)


def run_attack(
    targets: Sequence[Target],
    tokenizer: Tokenizer,
    *,
    n_contexts: int,
    columns: int,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    k: int = 20,
) -> tuple[list[Report], dict[str, Harvest]]:
    """Every method against every target; the harvests are keyed ``tier/method``."""
    strings = token_strings(tokenizer)
    cols = column_set(tokenizer, columns, seed)
    prompts = contexts(n_contexts, seed, tokenizer)
    reports, harvests = [], {}
    for target in targets:
        for method in methods:
            if method == "topk":
                harvest = harvest_topk(target, prompts, cols, strings, k)
            elif method == "carlini-topk":
                harvest = harvest_carlini(target, prompts, cols, strings, k)
            elif method == "forced-sample":
                harvest = harvest_forced(target, prompts, cols, strings, k)
            elif method == "token-ids":
                harvest = harvest_token_ids(target, prompts, cols)
            else:
                raise ValueError(f"unknown method {method!r}")
            harvests[f"{target.label}/{method}"] = harvest
            reports.append(report(harvest))
            print(reports[-1].markdown(None), flush=True)
    return reports, harvests


def bias_reachable(row: np.ndarray, max_entries: int, max_abs: float) -> int:
    """How many tokens a clamped ``logit_bias`` can make the argmax at temperature 0.

    The best a client can do for token t: +max_abs on t and -max_abs on the max_entries-1
    highest others; t wins if its logit then beats every other. Only such tokens can be
    measured by the logprob-free variant of the attack (binary search on the bias).
    """
    reachable = 0
    for t in range(len(row)):
        others = np.sort(np.delete(row, t))[::-1]
        lowered = others[: max_entries - 1] - max_abs
        rest = others[max_entries - 1 : max_entries]
        best_other = max(lowered.max(initial=-np.inf), rest.max(initial=-np.inf))
        reachable += bool(row[t] + max_abs > best_other)
    return reachable


def what_if_rows(
    truth: Harvest,
    prompts: Sequence[str],
    cols: Sequence[int],
    true_hidden: int,
    queries: int,
    policy_file: Path = POLICY_FILE,
) -> tuple[Report, str]:
    """The default tier's hardening applied offline to exact vectors, and the bias-limit bound.

    ``queries`` is what the forced-sample attack would spend on the same vectors.
    """
    k = tier_max_top(policy_file)
    simulated = hardened_what_if(truth.matrix, prompts, cols, default_hardening(policy_file), k)
    row = Report(
        "default (what-if, offline)",
        "forced-sample, if bias were allowed with logprobs",
        queries,
        1.0,
        estimate_hidden(simulated),
        "",
    )
    bias = tier_bias_limit(policy_file)
    reachable = [bias_reachable(r, *bias) for r in truth.matrix]
    line = (
        f"logit_bias limited to {bias[0]} entries of |b| <= {bias[1]}: a temperature-0 argmax "
        f"can be moved to a median {int(np.median(reachable))} (max {max(reachable)}) of the "
        f"{len(cols)} tokens per context, so the logprob-free variant of the attack reaches "
        f"{sum(r > true_hidden for r in reachable)} contexts with more than "
        f"{true_hidden} measurable logits"
    )
    return row, line


def main(argv: list[str] | None = None) -> None:
    """Run the attack on both tiers and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--contexts", type=int, default=176, help="logit vectors to build (> h)")
    ap.add_argument(
        "--columns", type=int, default=192, help="tokens per vector (0 = every unambiguous one)"
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    config = json.loads((args.model_dir / "config.json").read_text())
    true_hidden = int(config["hidden_size"])
    tokenizer = load_tokenizer(args.model_dir)
    cols = column_set(tokenizer, args.columns, args.seed)
    prompts = contexts(args.contexts, args.seed, tokenizer)
    with stack_from_args(args) as stack:
        reports, harvests = run_attack(
            [stack.trusted, stack.default],
            tokenizer,
            n_contexts=args.contexts,
            columns=args.columns,
            methods=methods,
            seed=args.seed,
        )
    notes = []
    truth = next(
        (
            harvests[f"trusted/{m}"]
            for m in ("token-ids", "forced-sample")
            if f"trusted/{m}" in harvests
            and harvests[f"trusted/{m}"].usable.shape[0] == len(prompts)
        ),
        None,
    )
    if truth is not None:
        forced = harvests.get("trusted/forced-sample")
        queries = forced.queries if forced else len(prompts) * len(cols)
        row, line = what_if_rows(truth, prompts, cols, true_hidden, queries)
        reports.append(row)
        notes.append(line)
    print(
        f"\nteacher hidden size {true_hidden}; {len(prompts)} contexts x {len(cols)} token "
        "columns\n"
    )
    print(HEADER)
    for r in reports:
        print(r.markdown(true_hidden))
    for line in notes:
        print(f"\n{line}")
    if args.json is not None:
        rows = [
            {
                "tier": r.tier,
                "method": r.method,
                "queries": r.queries,
                "coverage": r.coverage,
                "usable_vectors": r.estimate.vectors,
                "hidden_estimate": r.estimate.hidden,
                "refusal": r.refusal,
            }
            for r in reports
        ]
        payload = {"true_hidden": true_hidden, "rows": rows, "notes": notes}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
