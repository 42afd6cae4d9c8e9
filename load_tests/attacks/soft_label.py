"""Soft-label distillation: does training on returned logprobs beat training on the text alone?

    .venv/bin/python -m load_tests.attacks.soft_label [--vllm-url URL] [--model-dir DIR] [--quick]

Collects the teacher's greedy answers to N training-split questions with the largest top-k
logprobs each tier gives (trusted: 20 raw values; default: 5 hardened ones), then trains
fresh students from scratch (``soft_student``, the lab's architecture and budget) on the
first N answers: (a) on the answer tokens alone, controls that use no logprobs (``VARIANTS``),
(b) on the answer tokens plus the cross-entropy to the returned top-k distribution at every
answer position. Prints held-out greedy exact match for each N; every student sees the same
token sequences and batches.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from guard_server.teacher import task
from load_tests.attacks.common import (
    Target,
    add_stack_arguments,
    completion_logprobs,
    completions,
    stack_from_args,
    threads,
)
from load_tests.lab import student
from load_tests.lab.soft_student import Score, SoftExample, make_example, timed_run

SIZES = (1000, 5000, 20000)
QUICK_SIZES = (300,)
STEPS = 1200
"""Optimiser steps per student: about 3 minutes on one quiet CPU core (300 are too few for any
student to learn the task)."""
TRAIN_SEED = 7
"""Training questions come from ``task.make_problems(n, TRAIN_SEED, "train")`` (as the lab's)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One teacher answer as a client receives it: text, tokens, per-position top-k."""

    text: str
    tokens: list[str]
    top: list[dict[str, float]]


def collect(
    target: Target, problems: Sequence[task.Problem], k: int, cache: Path | None = None
) -> list[Answer]:
    """Greedy answers with ``logprobs=k`` (the tier may clamp it) for every problem."""
    prompts = [task.completion_prompt(p.question) for p in problems]
    return collect_prompts(target, prompts, k, cache)


def collect_prompts(
    target: Target,
    prompts: Sequence[str],
    k: int,
    cache: Path | None = None,
    *,
    temperature: float = 0.0,
    max_tokens: int = 32,
) -> list[Answer]:
    """Answers with ``logprobs=k`` (the tier may clamp it) for every prompt.

    With ``cache`` (a JSON-lines file), answers stored there for the same prompts are
    reused, and freshly collected ones are stored.
    """
    if cache is not None and cache.exists():
        rows = [json.loads(line) for line in cache.read_text().splitlines()]
        if len(rows) >= len(prompts) and all(
            r["prompt"] == p for r, p in zip(rows, prompts, strict=False)
        ):
            return [Answer(r["text"], r["tokens"], r["top"]) for r in rows[: len(prompts)]]
    bodies = [
        {"prompt": p, "max_tokens": max_tokens, "temperature": temperature, "logprobs": k}
        for p in prompts
    ]
    out = []
    for r in completions(target, bodies, concurrency=48):
        if not r.ok:
            raise RuntimeError(f"{target.label}: {r.error}")
        positions = completion_logprobs(r)
        out.append(
            Answer(
                r.body["choices"][0]["text"],
                [t for t, _, _ in positions],
                [{**top, t: v} for t, v, top in positions],
            )
        )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("w") as f:
            for p, a in zip(prompts, out, strict=True):
                f.write(json.dumps({"prompt": p, **asdict(a)}) + "\n")
    return out


class Vocabulary:
    """Maps the API's token texts back to ids (texts shared by several ids are dropped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        counts = Tally(texts)
        self.ids = {t: i for i, t in enumerate(texts) if counts[t] == 1}
        self.tokenizer = tokenizer

    def examples(self, prompts: Sequence[str], answers: Sequence[Answer], k: int):
        """Training examples: the teacher's own token sequence and its top-k per position.

        An answer with a token that cannot be mapped back is retokenized from its text
        (EOS appended) and gets no soft targets; the count of those is returned too.
        """
        prompt_ids = self.tokenizer(list(prompts)).input_ids
        examples: list[SoftExample] = []
        fallback = 0
        eos = self.tokenizer.eos_token_id
        for prompt, answer in zip(prompt_ids, answers, strict=True):
            ids = [self.ids.get(t) for t in answer.tokens]
            if any(i is None for i in ids) or not ids:
                fallback += 1
                response = [*self.tokenizer(answer.text, add_special_tokens=False).input_ids, eos]
                examples.append(make_example(prompt, response, [], k))
                continue
            soft = [
                sorted(
                    ((self.ids[t], v) for t, v in top.items() if t in self.ids),
                    key=lambda pair: -pair[1],
                )
                for top in answer.top
            ]
            examples.append(make_example(prompt, [i for i in ids if i is not None], soft, k))
        return examples, fallback


def answer_positions(tokens: Sequence[str]) -> list[int]:
    """Indices of the answer's digit tokens (the last run of digit tokens)."""
    out: list[int] = []
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i].isdigit():
            out.append(i)
        elif out:
            break
    return out[::-1]


def target_divergence(
    truth: Sequence[Answer],
    returned: Sequence[Answer],
    floor: float = 1e-4,
    digits_only: bool = False,
) -> tuple[float, float]:
    """How far each kind of target is from the teacher's true distribution, per position.

    Returns the mean KL(true top-k || target) in nats for (the text alone: one-hot on the
    emitted token, smoothed by ``floor``; the returned top-k plus tail). Both targets use
    the same tail treatment, so a returned top-k that carries information beyond the text
    scores lower than the one-hot. ``digits_only`` scores only the answer's digits.
    """
    text_kl, soft_kl = [], []
    for t_answer, r_answer in zip(truth, returned, strict=True):
        if t_answer.tokens != r_answer.tokens:
            continue
        positions = (
            answer_positions(t_answer.tokens) if digits_only else range(len(t_answer.tokens))
        )
        for i in positions:
            p = {k: math.exp(v) for k, v in t_answer.top[i].items()}
            q = {k: math.exp(v) for k, v in r_answer.top[i].items()}
            text_kl.append(_kl(p, {t_answer.tokens[i]: 1.0}, floor))
            soft_kl.append(_kl(p, q, floor))
    return float(np.mean(text_kl)), float(np.mean(soft_kl))


def rank_agreement(truth: Sequence[Answer], returned: Sequence[Answer]) -> float:
    """Share of positions where the returned tokens come in the true order of likelihood."""
    same = total = 0
    for t_answer, r_answer in zip(truth, returned, strict=True):
        if t_answer.tokens != r_answer.tokens:
            continue
        for true_top, top in zip(t_answer.top, r_answer.top, strict=True):
            order = sorted(top, key=lambda k: (-top[k], k))
            true_order = sorted(top, key=lambda k: -true_top.get(k, -math.inf))
            ties = len(set(top.values())) < len(top)
            total += 1
            same += order == true_order or (ties and _consistent(order, top, true_top))
    return same / total


def _consistent(order: list[str], top: dict[str, float], true_top: dict[str, float]) -> bool:
    """Whether returned values never contradict the true order (grid ties allowed)."""
    return all(
        not (top[a] > top[b] and true_top.get(a, -math.inf) < true_top.get(b, -math.inf))
        for a in order
        for b in order
    )


def _kl(p: dict[str, float], q: dict[str, float], floor: float) -> float:
    """KL(p || q) over p's tokens plus one tail bucket for everything else.

    A token of p that q does not list gets an equal share of q's leftover mass; every
    bucket of q is floored at ``floor`` and q renormalised, so the value is finite and >= 0.
    """
    missing = [k for k in p if k not in q]
    leftover = max(1.0 - sum(q.values()), 0.0) / (len(missing) + 1)
    buckets = [*p, None]
    p_vec = np.array([p.get(k, 0.0) for k in p] + [max(1.0 - sum(p.values()), 0.0)])
    q_vec = np.array([q.get(k, leftover) if k is not None else leftover for k in buckets])
    p_vec, q_vec = p_vec / p_vec.sum(), np.maximum(q_vec, floor)
    q_vec /= q_vec.sum()
    live = p_vec > 0
    return float(np.sum(p_vec[live] * np.log(p_vec[live] / q_vec[live])))


VARIANTS = ("text", "smoothed", "synthetic", "doubled", "trusted", "default")
"""Students per N: (a) text only; three controls that use no logprobs: (a') text with label
smoothing, (a'') text plus a made-up soft target (the emitted token at the default tier's mean
returned probability, the rest "any other token"), (a''') the text counted twice (its own
one-hot as the soft target: (b)'s loss were the returned values the text's); (b) text +
trusted top-k logprobs; (b) text + default (hardened) top-k logprobs."""
LABEL_SMOOTHING = 0.25
"""The control's smoothing: (b)'s loss puts weight 1 on the text and 1 on a hardened target
whose top token holds about half the mass, i.e. about a quarter of the total off the label."""


def mean_emitted_probability(answers: Sequence[Answer]) -> float:
    """Mean returned probability of the emitted token, over every answer position."""
    values = [math.exp(top[t]) for a in answers for t, top in zip(a.tokens, a.top, strict=True)]
    return float(np.mean(values))


def synthetic_example(example: SoftExample, top_p: float) -> SoftExample:
    """The example with its soft targets replaced by ones made from the text alone: the
    emitted token at ``top_p``, the rest of the mass on "any other token"."""
    soft = [[(token, math.log(top_p))] for token in example.response]
    return make_example(example.prompt, example.response, soft, 1)


@dataclass(slots=True)
class Row:
    """Held-out scores of the students trained on the first N answers, by variant."""

    n: int
    scores: dict[str, Score]


def run_attack(
    trusted: Target,
    default: Target,
    tokenizer: PreTrainedTokenizerFast,
    *,
    sizes: Sequence[int],
    cfg: student.StudentConfig,
    eval_n: int,
    seed: int = 0,
    soft_weight: float = 1.0,
    label_smoothing: float = LABEL_SMOOTHING,
    variants: Sequence[str] = VARIANTS,
    cache: Path | None = None,
    log=print,
) -> tuple[list[Row], dict]:
    """Collect from both tiers (the same questions), train and evaluate every student.

    ``cache`` is a folder for the collected answers (one JSON-lines file per tier). The
    text students train on the trusted tier's answers (the text is the same in both tiers:
    ``facts["same_text"]`` says so).
    """
    problems = task.make_problems(max(sizes), TRAIN_SEED, "train")
    answers = {
        target.label: collect(
            target, problems, 20, cache / f"{target.label}.jsonl" if cache else None
        )
        for target in (trusted, default)
    }
    vocab = Vocabulary(tokenizer)
    same_text = sum(
        a.text == b.text for a, b in zip(answers["trusted"], answers["default"], strict=True)
    )
    facts: dict = {
        "questions": len(problems),
        "same_text": same_text,
        "teacher_correct": {
            tier: sum(task.check(p, a.text) for p, a in zip(problems, got, strict=True))
            / len(problems)
            for tier, got in answers.items()
        },
        "top_k": {tier: max(len(t) for a in got for t in a.top) for tier, got in answers.items()},
        "label_smoothing": label_smoothing,
    }
    facts["kl_text_vs_soft"] = {
        tier: target_divergence(answers["trusted"], got) for tier, got in answers.items()
    }
    facts["kl_text_vs_soft_digits"] = {
        tier: target_divergence(answers["trusted"], got, digits_only=True)
        for tier, got in answers.items()
    }
    facts["rank_agreement"] = {
        tier: rank_agreement(answers["trusted"], got) for tier, got in answers.items()
    }
    examples, fallback = {}, {}
    for tier, got in answers.items():
        examples[tier], fallback[tier] = vocab.examples(
            [task.completion_prompt(p.question) for p in problems], got, 20
        )
    facts["retokenized"] = fallback
    facts["synthetic_top_p"] = mean_emitted_probability(answers["default"])
    examples["synthetic"] = [
        synthetic_example(e, facts["synthetic_top_p"]) for e in examples["trusted"]
    ]
    examples["doubled"] = [synthetic_example(e, 1.0) for e in examples["trusted"]]
    log(f"collected: {json.dumps(facts)}")
    heldout = task.make_problems(eval_n, seed=1, split="heldout")
    recipes = {
        "text": ("trusted", 0.0, 0.0),
        "smoothed": ("trusted", 0.0, label_smoothing),
        "synthetic": ("synthetic", soft_weight, 0.0),
        "doubled": ("doubled", soft_weight, 0.0),
        "trusted": ("trusted", soft_weight, 0.0),
        "default": ("default", soft_weight, 0.0),
    }
    rows = []
    for n in sorted(sizes):
        scores = {}
        for variant in variants:
            tier, weight, smoothing = recipes[variant]
            score = timed_run(
                examples[tier][:n],
                heldout,
                tokenizer,
                cfg,
                soft_weight=weight,
                label_smoothing=smoothing,
                seed=seed,
            )
            scores[variant] = score
            log(
                f"N={n} seed={seed} {variant}: exact {score.exact_match:.4f}, digits "
                f"{score.digit_accuracy:.4f} ({score.seconds:.0f}s)"
            )
        rows.append(Row(n, scores))
    return rows, facts


def markdown(rows: Sequence[Row], facts: dict) -> str:
    """The results table: greedy exact match / teacher-forced digit accuracy per variant."""
    k = facts["top_k"]
    titles = {
        "text": "(a) text only",
        "smoothed": f"(a') text, label smoothing {facts['label_smoothing']}",
        "synthetic": f"(a'') text + made-up top-1 at p={facts['synthetic_top_p']:.2f}",
        "doubled": "(a''') text counted twice",
        "trusted": f"(b) + trusted top-{k['trusted']} logprobs",
        "default": f"(b) + default top-{k['default']} logprobs",
    }
    variants = [v for v in VARIANTS if any(v in r.scores for r in rows)]
    lines = [
        "| N | " + " | ".join(titles[v] for v in variants) + " | train time per student |",
        "|---:|" + "---:|" * (len(variants) + 1),
    ]
    for r in rows:
        cells = [
            f"{r.scores[v].exact_match:.1%} / {r.scores[v].digit_accuracy:.1%}"
            if v in r.scores
            else "-"
            for v in variants
        ]
        seconds = max(s.seconds for s in r.scores.values())
        lines.append(f"| {r.n:,} | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the experiment and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--quick", action="store_true", help="N=300, 60 steps, 100 held-out")
    ap.add_argument("--steps", type=int, default=STEPS, help="optimiser steps per student")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--soft-weight", type=float, default=1.0)
    ap.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="students to train per N, from: " + ", ".join(VARIANTS),
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep collected answers")
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = replace(student.StudentConfig(), steps=args.steps)
    eval_n = args.eval_n
    if args.quick:
        sizes, cfg, eval_n = list(QUICK_SIZES), replace(cfg, steps=60), 100
    tokenizer = student.load_tokenizer(args.model_dir)
    with stack_from_args(args) as stack:
        rows, facts = run_attack(
            stack.trusted,
            stack.default,
            tokenizer,
            sizes=sizes,
            cfg=cfg,
            eval_n=eval_n,
            seed=args.seed,
            soft_weight=args.soft_weight,
            label_smoothing=args.label_smoothing,
            variants=args.variants.split(","),
            cache=args.cache,
        )
    print(
        f"\nstudent: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.steps} steps x batch "
        f"{cfg.batch}, soft weight {args.soft_weight}; held-out greedy exact match on {eval_n}; "
        f"teacher answers correct {facts['teacher_correct']}; identical text in both tiers "
        f"{facts['same_text']}/{facts['questions']}; KL(true || target) per answer position, "
        f"(text one-hot, returned top-k): {facts['kl_text_vs_soft']}\n"
    )
    print(markdown(rows, facts))
    if args.json is not None:
        payload = {"rows": [asdict(r) for r in rows], "facts": facts}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
