"""Soft-label distillation: does training on returned logprobs beat training on the text alone?

    .venv/bin/python -m load_tests.attacks.soft_label [--vllm-url URL] [--model-dir DIR] [--quick]

Collects the teacher's greedy answers to N training-split questions with the largest top-k
logprobs each tier gives (trusted: 20 raw values; default: 5 hardened ones), then trains
fresh students from scratch (``soft_student``, the lab's architecture and budget) on the
first N answers: (a) on the answer tokens alone, (b) on the answer tokens plus the
cross-entropy to the returned top-k distribution at every answer position. Prints held-out
greedy exact match for each N; (a) uses the same token sequences and batches as (b).
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
from load_tests.attacks.soft_student import SoftExample, make_example, timed_run
from load_tests.lab import student

SIZES = (1000, 5000, 20000)
QUICK_SIZES = (300,)
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
    """Greedy answers with ``logprobs=k`` (the tier may clamp it) for every problem.

    With ``cache`` (a JSON-lines file), answers stored there for the same questions are
    reused, and freshly collected ones are stored.
    """
    if cache is not None and cache.exists():
        rows = [json.loads(line) for line in cache.read_text().splitlines()]
        if len(rows) >= len(problems) and all(
            r["question"] == p.question for r, p in zip(rows, problems, strict=False)
        ):
            return [Answer(r["text"], r["tokens"], r["top"]) for r in rows[: len(problems)]]
    bodies = [
        {
            "prompt": task.completion_prompt(p.question),
            "max_tokens": 32,
            "temperature": 0,
            "logprobs": k,
        }
        for p in problems
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
            for p, a in zip(problems, out, strict=True):
                f.write(json.dumps({"question": p.question, **asdict(a)}) + "\n")
    return out


class Vocabulary:
    """Maps the API's token texts back to ids (texts shared by several ids are dropped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        counts = Tally(texts)
        self.ids = {t: i for i, t in enumerate(texts) if counts[t] == 1}
        self.tokenizer = tokenizer

    def examples(self, problems: Sequence[task.Problem], answers: Sequence[Answer], k: int):
        """Training examples: the teacher's own token sequence and its top-k per position.

        An answer with a token that cannot be mapped back is retokenized from its text
        (EOS appended) and gets no soft targets; the count of those is returned too.
        """
        prompts = self.tokenizer([task.completion_prompt(p.question) for p in problems]).input_ids
        examples: list[SoftExample] = []
        fallback = 0
        eos = self.tokenizer.eos_token_id
        for prompt, answer in zip(prompts, answers, strict=True):
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


def target_divergence(
    truth: Sequence[Answer], returned: Sequence[Answer], floor: float = 1e-4
) -> tuple[float, float]:
    """How far each kind of target is from the teacher's true distribution, per position.

    Returns the mean KL(true top-k || target) in nats for (the text alone: one-hot on the
    emitted token, smoothed by ``floor``; the returned top-k plus tail). Both targets use
    the same tail treatment, so a returned top-k that carries information beyond the text
    scores lower than the one-hot.
    """
    text_kl, soft_kl = [], []
    for t_answer, r_answer in zip(truth, returned, strict=True):
        if t_answer.tokens != r_answer.tokens:
            continue
        for token, true_top, top in zip(t_answer.tokens, t_answer.top, r_answer.top, strict=True):
            p = {k: math.exp(v) for k, v in true_top.items()}
            one_hot = {token: 1 - floor}
            q = {k: math.exp(v) for k, v in top.items()}
            text_kl.append(_kl(p, one_hot, floor))
            soft_kl.append(_kl(p, q, floor))
    return float(np.mean(text_kl)), float(np.mean(soft_kl))


def _kl(p: dict[str, float], q: dict[str, float], floor: float) -> float:
    """KL over p's tokens plus one tail bucket; q's missing tokens share its leftover mass."""
    q_rest = max(1.0 - sum(q.values()), floor)
    missing = [k for k in p if k not in q]
    total = 0.0
    for k, pk in p.items():
        qk = max(q.get(k, q_rest / (len(missing) + 1)), floor)
        total += pk * math.log(pk / qk) if pk > 0 else 0.0
    p_rest = max(1.0 - sum(p.values()), 0.0)
    if p_rest > 0:
        total += p_rest * math.log(p_rest / max(q_rest / (len(missing) + 1), floor))
    return total


@dataclass(slots=True)
class Row:
    """Held-out exact match of the students trained on the first N answers."""

    n: int
    text_only: float
    trusted_soft: float
    default_soft: float
    seconds: float


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
    cache: Path | None = None,
    log=print,
) -> tuple[list[Row], dict]:
    """Collect from both tiers (the same questions), train and evaluate every student.

    ``cache`` is a folder for the collected answers (one JSON-lines file per tier).
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
    }
    facts["kl_text_vs_soft"] = {
        tier: target_divergence(answers["trusted"], got) for tier, got in answers.items()
    }
    examples, fallback = {}, {}
    for tier, got in answers.items():
        examples[tier], fallback[tier] = vocab.examples(problems, got, 20)
    facts["retokenized"] = fallback
    log(f"collected: {json.dumps(facts)}")
    heldout = task.make_problems(eval_n, seed=1, split="heldout")
    rows = []
    for n in sorted(sizes):
        text_acc, seconds = timed_run(
            examples["trusted"][:n], heldout, tokenizer, cfg, soft_weight=0.0, seed=seed
        )
        log(f"N={n} (a) text only: {text_acc:.4f} ({seconds:.0f}s)")
        if same_text != len(problems):
            default_text, _ = timed_run(
                examples["default"][:n], heldout, tokenizer, cfg, soft_weight=0.0, seed=seed
            )
            log(f"N={n} (a) text only, default-tier text: {default_text:.4f}")
        soft = {}
        for tier in ("trusted", "default"):
            soft[tier], s = timed_run(
                examples[tier][:n], heldout, tokenizer, cfg, soft_weight=soft_weight, seed=seed
            )
            log(f"N={n} (b) + {tier}-tier logprobs: {soft[tier]:.4f} ({s:.0f}s)")
        rows.append(Row(n, text_acc, soft["trusted"], soft["default"], seconds))
    return rows, facts


def markdown(rows: Sequence[Row], facts: dict) -> str:
    """The results table."""
    k = facts["top_k"]
    lines = [
        f"| N | (a) text only | (b) + trusted top-{k['trusted']} logprobs "
        f"| (b) + default top-{k['default']} logprobs | train time per student |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.n:,} | {r.text_only:.1%} | {r.trusted_soft:.1%} | {r.default_soft:.1%} "
        f"| {r.seconds:.0f} s |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the experiment and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--quick", action="store_true", help="N=300, 60 steps, 100 held-out")
    ap.add_argument("--steps", type=int, default=student.StudentConfig.steps)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--soft-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep collected answers")
    args = ap.parse_args(argv)
    threads(2)
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
