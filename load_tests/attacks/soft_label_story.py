"""Soft-label distillation of a teacher with dark knowledge: the lab's storyteller.

    .venv/bin/python -m load_tests.attacks.soft_label_story --vllm-url URL --cache DIR

(URL: a vLLM serving ``load_tests/lab/storyteller``.) The bundled arithmetic teacher is
nearly certain of every token, so its logprobs tell a distiller nothing its text does not.
The storyteller's next word is one of 24 with Zipf-like probabilities: its top-k logprobs
carry the very distribution a text-only student has to estimate from samples. The attacker
asks for stories about N training topics at T = 1 with ``logprobs: 20`` (the default tier
clamps to 5 and hardens them), and fresh students (the storyteller's size) learn (a) from the
text, (a'') from the text plus a made-up soft target, (b) from the text plus the returned
top-k, and (b) under an offline what-if tier (``WHAT_IF``) applied to the trusted answers.
Scores: the student's NLL of fresh chain stories (nats per word; the floor is the chain's
entropy, so the excess measures the distance to the teacher's knowledge) and the share of
valid word transitions in 300 stories the student samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from guard_server.defences.logprobs import LogprobHardening
from load_tests.attacks.common import (
    SECRET,
    Target,
    add_stack_arguments,
    stack_from_args,
    threads,
)
from load_tests.attacks.soft_label import (
    Answer,
    Vocabulary,
    collect_prompts,
    mean_emitted_probability,
    synthetic_example,
)
from load_tests.lab import story, student
from load_tests.lab.soft_student import train
from load_tests.lab.train_storyteller import STORYTELLER_DIR, evaluate, heldout_nll

SIZES = (100, 1000, 5000)
TRAIN_SEED = 11
STUDENT = student.StudentConfig(layers=2, steps=600, batch=64, lr=3e-3)
"""The storyteller's own size and learning rate; 600 steps of 64 stories."""
VARIANTS = ("text", "synthetic", "trusted", "default", "what-if")
SOURCE = {"text": "trusted", "synthetic": "synthetic", "trusted": "trusted"}
"""Which examples each student learns from (the text student reads the trusted tier's text);
other variants learn from their own."""
WHAT_IF_TOP = 1
WHAT_IF = LogprobHardening(noise_scale=3.0, quantize="grid", grid_step=0.5)
"""An offline what-if tier, stricter than the default: top-1 (plus the sampled token), keyed
noise of scale 3, order kept, renormalised, 0.5 grid."""


def harden_offline(answers: Sequence[Answer], hardening: LogprobHardening, k: int) -> list[Answer]:
    """The trusted tier's raw answers as a tier returning top-``k`` under ``hardening`` would
    (the sampled token always listed; one key per answer, from the harness's fixed secret)."""
    out = []
    for n, answer in enumerate(answers):
        key = hashlib.blake2b(SECRET + n.to_bytes(4, "little"), digest_size=32).digest()
        tops = []
        for position, (token, top) in enumerate(zip(answer.tokens, answer.top, strict=True)):
            kept = dict(sorted(top.items(), key=lambda item: -item[1])[:k])
            kept[token] = top[token]
            tokens = list(kept)
            values = hardening.apply(
                key, position, tokens, [kept[t] for t in tokens], tokens.index(token)
            )
            tops.append(dict(zip(tokens, values, strict=True)))
        out.append(Answer(answer.text, answer.tokens, tops))
    return out


def first_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    """Each chain word's first token text, as it starts a word inside a story."""
    return {
        w: tokenizer.decode(tokenizer(" " + w, add_special_tokens=False).input_ids[:1])
        for w in story.WORDS
    }


def word_start_divergence(
    answers: Sequence[Answer], tokenizer: PreTrainedTokenizerFast, floor: float = 1e-4
) -> tuple[float, int]:
    """How far the returned top-k is from the chain where a new word starts.

    At every answer token that starts a word after a chain word, the truth is the chain's
    distribution of the next word's first token. The target is the returned top-k over the
    first tokens of all chain words, the mass it leaves unlisted spread evenly over the
    unlisted ones (a student does not know which words may follow), each floored at
    ``floor``. Returns the mean KL(truth || target) in nats and the positions scored.
    """
    chain = story.chain()
    first = first_tokens(tokenizer)
    index = {token: i for i, token in enumerate(sorted(set(first.values())))}
    truth_of: dict[str, np.ndarray] = {}
    for word in story.WORDS:
        truth = np.zeros(len(index))
        for nxt, p in zip(chain.successors[word], chain.probs[word], strict=True):
            truth[index[first[nxt]]] += p
        truth_of[word] = truth
    values = []
    for answer in answers:
        word = ""  # the word the answer is writing
        for token, top in zip(answer.tokens, answer.top, strict=True):
            starts_word = token.startswith(" ")
            if starts_word and word in truth_of:
                listed = np.zeros(len(index), dtype=bool)
                target = np.zeros(len(index))
                for t, v in top.items():
                    if t in index:
                        listed[index[t]] = True
                        target[index[t]] = math.exp(v)
                unlisted = max(int((~listed).sum()), 1)
                target[~listed] = max(1.0 - float(target.sum()), 0.0) / unlisted
                target = np.maximum(target, floor)
                target /= target.sum()
                truth = truth_of[word]
                live = truth > 0
                values.append(float(np.sum(truth[live] * np.log(truth[live] / target[live]))))
            word = token.strip() if starts_word else word + token
    return float(np.mean(values)), len(values)


@dataclass(frozen=True, slots=True)
class Score:
    """A student's held-out scores and its training time."""

    nll: float  # nats per word transition on fresh chain stories
    valid: float  # share of valid transitions in stories it samples
    seconds: float


def run_attack(
    trusted: Target,
    default: Target,
    tokenizer: PreTrainedTokenizerFast,
    *,
    sizes: Sequence[int],
    cfg: student.StudentConfig,
    seed: int = 0,
    variants: Sequence[str] = VARIANTS,
    cache: Path | None = None,
    log=print,
) -> tuple[dict[int, dict[str, Score]], dict]:
    """Collect stories from both tiers, train every student on the first N, score each."""
    prompts = [story.prompt(t) for t in story.topics(max(sizes), TRAIN_SEED)]
    answers = {
        target.label: collect_prompts(
            target,
            prompts,
            20,
            cache / f"story-{target.label}.jsonl" if cache else None,
            temperature=1.0,
            max_tokens=96,
        )
        for target in (trusted, default)
    }
    answers["what-if"] = harden_offline(answers["trusted"], WHAT_IF, WHAT_IF_TOP)
    vocab = Vocabulary(tokenizer)
    examples, fallback = {}, {}
    for tier, got in answers.items():
        examples[tier], fallback[tier] = vocab.examples(prompts, got, 20)
    synthetic_p = mean_emitted_probability(answers["default"])
    examples["synthetic"] = [synthetic_example(e, synthetic_p) for e in examples["trusted"]]
    facts = {
        "stories": len(prompts),
        "top_k": {tier: max(len(t) for a in got for t in a.top) for tier, got in answers.items()},
        "mean_emitted_p": {tier: mean_emitted_probability(got) for tier, got in answers.items()},
        "retokenized": fallback,
        "chain_entropy": story.entropy(),
        "word_start_kl": {
            tier: word_start_divergence(got, tokenizer) for tier, got in answers.items()
        },
    }
    log(f"collected: {json.dumps(facts)}")
    rows: dict[int, dict[str, Score]] = {}
    for n in sorted(sizes):
        rows[n] = {}
        for variant in variants:
            started = time.monotonic()
            model = train(
                examples[SOURCE.get(variant, variant)][:n],
                tokenizer,
                cfg,
                soft_weight=0.0 if variant == "text" else 1.0,
                seed=seed,
            )
            seconds = time.monotonic() - started
            score = Score(
                heldout_nll(model, tokenizer), evaluate(model, tokenizer, 300, 1).valid, seconds
            )
            rows[n][variant] = score
            log(
                f"N={n} seed={seed} {variant}: NLL {score.nll:.3f} nats/word, "
                f"valid {score.valid:.4f} ({seconds:.0f}s)"
            )
    return rows, facts


def main(argv: list[str] | None = None) -> None:
    """Run the experiment and print one line per student."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_stack_arguments(ap)
    ap.set_defaults(model_dir=STORYTELLER_DIR)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--steps", type=int, default=STUDENT.steps)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep collected stories")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        ap.error(f"unknown variants; choose from {', '.join(VARIANTS)}")
    threads(2)
    tokenizer = student.load_tokenizer(args.model_dir)
    with stack_from_args(args) as stack:
        rows, facts = run_attack(
            stack.trusted,
            stack.default,
            tokenizer,
            sizes=[int(s) for s in args.sizes.split(",")],
            cfg=replace(STUDENT, steps=args.steps),
            seed=args.seed,
            variants=variants,
            cache=args.cache,
        )
    if args.json:
        payload = {
            "facts": facts,
            "rows": {n: {v: asdict(s) for v, s in r.items()} for n, r in rows.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
