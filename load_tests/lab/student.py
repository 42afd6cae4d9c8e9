"""A from-scratch student: a small Llama trained on (prompt, teacher answer) pairs.

The student shares the teacher's tokenizer (as a distilling attacker would choose to) and sees
only what an API client sees: the prompt text and the teacher's answer text.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from guard_server.teacher import MODEL_DIR, task
from load_tests.lab import lm

Pair = tuple[str, str]
"""One distillation example: (completion prompt text, teacher's answer text)."""


@dataclass(frozen=True, slots=True)
class StudentConfig:
    """Student size and training budget (a fixed number of optimiser steps)."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    steps: int = 1200
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05


def load_tokenizer(path: Path = MODEL_DIR) -> PreTrainedTokenizerFast:
    """The teacher's tokenizer."""
    return PreTrainedTokenizerFast.from_pretrained(path)


def _epochs(examples: list[lm.Example], batch: int, rng: random.Random, pool: int = 8):
    """Endless batches: reshuffle every epoch, group by length within pools of batches."""
    while True:
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch * pool):
            yield from lm.length_grouped(order[i : i + batch * pool], batch, rng)


def fresh_student(
    tokenizer: PreTrainedTokenizerFast, cfg: StudentConfig, seed: int
) -> tuple[LlamaForCausalLM, random.Random]:
    """An untrained student of ``cfg``'s size, and the data-order generator of ``seed``."""
    torch.manual_seed(seed)
    rng = random.Random(f"student:{seed}")
    model = lm.llama(
        tokenizer,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        intermediate=cfg.intermediate,
    )
    return model, rng


def train_student(
    pairs: Sequence[Pair],
    tokenizer: PreTrainedTokenizerFast,
    cfg: StudentConfig | None = None,
    seed: int = 0,
    log_every: int = 100,
) -> LlamaForCausalLM:
    """Train a fresh student on ``pairs`` for ``cfg.steps`` steps (however many epochs that is).

    Every pair's answer is used as given (``lm.encode_examples`` appends EOS), and the loss
    covers only the answer tokens.
    """
    cfg = cfg or StudentConfig()
    model, rng = fresh_student(tokenizer, cfg, seed)
    examples = lm.encode_examples(tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    batches = _epochs(examples, min(cfg.batch, len(examples)), rng)
    pad = tokenizer.pad_token_id

    def next_batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return lm.collate(next(batches), pad)

    train_cfg = lm.TrainConfig(
        steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, log_every=log_every
    )
    lm.train_lm(model, next_batch, train_cfg)
    return model


def evaluate_student(
    model: LlamaForCausalLM,
    problems: Sequence[task.Problem],
    tokenizer: PreTrainedTokenizerFast,
) -> float:
    """Greedy exact-match of ``model`` on ``problems`` (use held-out ones)."""
    return lm.exact_match(model, tokenizer, problems)


def timed_run(
    pairs: Sequence[Pair],
    heldout: Sequence[task.Problem],
    tokenizer: PreTrainedTokenizerFast,
    cfg: StudentConfig | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Train on ``pairs`` and evaluate on ``heldout``; return (accuracy, training seconds)."""
    start = time.monotonic()
    model = train_student(pairs, tokenizer, cfg, seed)
    seconds = time.monotonic() - start
    return evaluate_student(model, heldout, tokenizer), seconds
