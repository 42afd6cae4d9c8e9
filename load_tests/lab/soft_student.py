"""A student trained on the teacher's text plus its top-k logprobs (soft labels), on the CPU.

Extends ``load_tests.lab.student``: same model, optimiser, schedule and evaluation; the loss
adds, at every answer position, the cross-entropy to the teacher's returned top-k
distribution with the unreturned mass lumped into one "any other token" bucket (the KL to the
soft target up to a constant). With ``soft_weight=0`` it is plain text distillation on the
very same token sequences and batches, so (a) text-only and (b) soft-label runs differ only
in the loss. ``label_smoothing`` gives the text-only attacker the regulariser it can have
without any logprobs: the control that tells information in soft targets from smoothing.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from guard_server.teacher import task
from load_tests.lab import lm, student


@dataclass(frozen=True, slots=True)
class SoftExample:
    """One training example in token ids, with the teacher's top-k at each answer position.

    Row ``r`` of ``soft_ids`` / ``soft_p`` holds the returned tokens (id -1 = none) and their
    probabilities for response token ``r``.
    """

    prompt: list[int]
    response: list[int]
    soft_ids: torch.Tensor
    soft_p: torch.Tensor


def make_example(
    prompt: list[int], response: list[int], soft: Sequence[Sequence[tuple[int, float]]], k: int
) -> SoftExample:
    """Build an example; ``soft[r]`` lists (token id, logprob) for response token ``r``."""
    ids = torch.full((len(response), k), -1, dtype=torch.long)
    probs = torch.zeros((len(response), k))
    for r, pairs in enumerate(soft[: len(response)]):
        for j, (token, logprob) in enumerate(pairs[:k]):
            ids[r, j] = token
            probs[r, j] = math.exp(logprob)
    return SoftExample(prompt, response, ids, probs)


@dataclass(slots=True)
class SoftBatch:
    """Labels plus soft targets, aligned with ``labels`` (K tokens per position, id -1 = none)."""

    labels: torch.Tensor
    soft_ids: torch.Tensor
    soft_p: torch.Tensor


def collate(examples: Sequence[SoftExample], pad_id: int) -> tuple[torch.Tensor, SoftBatch]:
    """Right-padded ids and a :class:`SoftBatch` (as ``lm.collate``, plus the soft targets)."""
    ids, labels = lm.collate([(e.prompt, e.response) for e in examples], pad_id)
    k = max(e.soft_ids.shape[1] for e in examples)
    soft_ids = torch.full((*ids.shape, k), -1, dtype=torch.long)
    soft_p = torch.zeros((*ids.shape, k))
    for i, e in enumerate(examples):
        start, width = len(e.prompt), e.soft_ids.shape[1]
        soft_ids[i, start : start + len(e.response), :width] = e.soft_ids
        soft_p[i, start : start + len(e.response), :width] = e.soft_p
    return ids, SoftBatch(labels, soft_ids, soft_p)


class SoftLoss(torch.nn.Module):
    """Wraps a causal LM: ``forward(input_ids, labels=SoftBatch)`` returns ``.loss``.

    loss = CE(answer tokens, smoothed by ``label_smoothing`` toward uniform)
    + soft_weight * H(teacher top-k + tail, student), so it plugs into ``lm.train_lm``
    unchanged.
    """

    def __init__(
        self, model: LlamaForCausalLM, soft_weight: float, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.soft_weight = soft_weight
        self.label_smoothing = label_smoothing

    def forward(self, input_ids: torch.Tensor, labels: SoftBatch) -> SimpleNamespace:
        logits = self.model(input_ids=input_ids).logits[:, :-1].float()
        target = labels.labels[:, 1:]
        mask = target != lm.IGNORE
        ce = torch.nn.functional.cross_entropy(
            logits[mask], target[mask], label_smoothing=self.label_smoothing
        )
        if self.soft_weight == 0:
            return SimpleNamespace(loss=ce)
        logp = torch.log_softmax(logits, dim=-1)
        sid, sp = labels.soft_ids[:, 1:], labels.soft_p[:, 1:]
        valid = sid >= 0
        has = valid.any(dim=-1) & mask
        if not has.any():
            return SimpleNamespace(loss=ce)
        picked = logp.gather(-1, sid.clamp(min=0)) * valid
        cross = -(sp * picked).sum(dim=-1)
        covered = (picked.exp() * valid).sum(dim=-1).clamp(max=1 - 1e-6)
        rest = (1 - (sp * valid).sum(dim=-1)).clamp(min=0)
        tail = -rest * torch.log1p(-covered)
        soft = (cross + tail)[has].mean()
        return SimpleNamespace(loss=ce + self.soft_weight * soft)


def _batches(
    examples: list[SoftExample], batch: int, rng: random.Random, pool: int = 8
) -> Iterator[list[SoftExample]]:
    """Endless length-grouped batches, reshuffled every epoch (as ``student`` does)."""
    while True:
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch * pool):
            chunk = order[i : i + batch * pool]
            chunk.sort(key=lambda e: len(e.prompt) + len(e.response))
            groups = [chunk[j : j + batch] for j in range(0, len(chunk), batch)]
            rng.shuffle(groups)
            yield from groups


def train(
    examples: Sequence[SoftExample],
    tokenizer: PreTrainedTokenizerFast,
    cfg: student.StudentConfig,
    *,
    soft_weight: float,
    label_smoothing: float = 0.0,
    seed: int = 0,
    log_every: int = 100,
) -> LlamaForCausalLM:
    """A fresh student (``lab.student``'s architecture) trained for ``cfg.steps`` steps."""
    model, rng = student.fresh_student(tokenizer, cfg, seed)
    batches = _batches(list(examples), min(cfg.batch, len(examples)), rng)
    pad = tokenizer.pad_token_id

    def next_batch(_step: int) -> tuple[torch.Tensor, SoftBatch]:
        return collate(next(batches), pad)

    train_cfg = lm.TrainConfig(
        steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, log_every=log_every
    )
    wrapped = SoftLoss(model, soft_weight, label_smoothing)
    lm.train_lm(wrapped, next_batch, train_cfg, log=lambda _m: None)  # type: ignore[arg-type]
    return model


FORCED_TEMPLATE = " The answer is {s}."
"""One of the teacher's answer phrasings (``task.ANSWER_TEMPLATES``), used to score digits."""


@torch.no_grad()
def forced_digit_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: Sequence[task.Problem]
) -> float:
    """Share of the sum's digits the student predicts (argmax) given the correct prefix.

    Teacher-forced on ``prompt + " The answer is <sum>."``: a graded measure that moves
    before greedy exact match does.
    """
    model.eval()
    hits = total = 0
    for i in range(0, len(problems), 250):
        chunk = problems[i : i + 250]
        texts = [
            task.completion_prompt(p.question) + FORCED_TEMPLATE.format(s=p.answer) for p in chunk
        ]
        encoded = [tokenizer(t).input_ids for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, e in enumerate(encoded):
            ids[j, : len(e)] = torch.tensor(e)
        predicted = model(input_ids=ids).logits.argmax(dim=-1)
        for j, (p, e) in enumerate(zip(chunk, encoded, strict=True)):
            end = len(e) - 1  # the final "."
            for position in range(end - len(p.answer), end):
                hits += int(predicted[j, position - 1] == e[position])
                total += 1
    return hits / total


@dataclass(frozen=True, slots=True)
class Score:
    """A trained student's held-out scores and its training time."""

    exact_match: float
    digit_accuracy: float
    seconds: float


def timed_run(
    examples: Sequence[SoftExample],
    heldout: Sequence[task.Problem],
    tokenizer: PreTrainedTokenizerFast,
    cfg: student.StudentConfig,
    *,
    soft_weight: float,
    label_smoothing: float = 0.0,
    seed: int = 0,
) -> Score:
    """Train, then score on ``heldout``: greedy exact match and teacher-forced digit accuracy."""
    start = time.monotonic()
    model = train(
        examples,
        tokenizer,
        cfg,
        soft_weight=soft_weight,
        label_smoothing=label_smoothing,
        seed=seed,
    )
    seconds = time.monotonic() - start
    return Score(
        student.evaluate_student(model, heldout, tokenizer),
        forced_digit_accuracy(model, tokenizer, heldout),
        seconds,
    )
