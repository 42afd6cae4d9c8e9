"""Shared helpers for the lab's small causal LMs: batching, training loop, greedy evaluation."""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from guard_server.teacher import task

IGNORE = -100
"""Label value that the loss skips (prompt and padding positions)."""

Example = tuple[list[int], list[int]]
"""Token ids of one training example: (prompt ids with BOS, response ids ending in EOS)."""


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], responses: Sequence[str]
) -> list[Example]:
    """Tokenize prompts (BOS added) and responses (EOS appended) the way generation sees them."""
    prompt_ids = tokenizer(list(prompts)).input_ids
    response_ids = tokenizer(list(responses), add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p, [*r, eos]) for p, r in zip(prompt_ids, response_ids, strict=True)]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad examples into ``input_ids`` and ``labels``; only response tokens are labelled.

    Right padding needs no attention mask: with causal attention no real token sees a pad.
    """
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
    return ids, labels


def length_grouped(
    examples: Sequence[Example], batch: int, rng: random.Random
) -> list[list[Example]]:
    """Cut ``examples`` into batches of similar length (less padding), in random order."""
    ordered = sorted(examples, key=lambda e: len(e[0]) + len(e[1]))
    chunks = [ordered[i : i + batch] for i in range(0, len(ordered), batch)]
    rng.shuffle(chunks)
    return chunks


def llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 512,
    max_positions: int = 256,
) -> LlamaForCausalLM:
    """A freshly initialised float32 Llama (untied embeddings) for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def training_parser(
    description: str | None, *, out: Path, steps: int, batch: int, lr: float, layers: int
) -> argparse.ArgumentParser:
    """The options every model trainer of the lab shares, with that model's defaults."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write weights, generation config and tokenizer to ``out``, ready for vLLM."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def bf16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 matmuls (AVX512-BF16 or AMX). Without them,
    bfloat16 autocast is emulated and about 8x slower than float32 (measured on this
    project's AVX2 machines: 7.3 against 0.9 CPU-seconds per student step)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Optimiser settings: AdamW with a one-cycle learning-rate schedule."""

    steps: int
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    clip: float = 1.0
    bf16: bool = field(default_factory=bf16_is_fast)
    log_every: int = 100


def train_lm(
    model: LlamaForCausalLM,
    next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    log: Callable[[str], None] | None = None,
) -> float:
    """Train ``model`` for ``cfg.steps`` steps on ``next_batch(step)``; return the last mean loss.

    Matmuls run under bfloat16 autocast on a CPU with native bfloat16 (``cfg.bf16``; weights
    and optimiser state stay float32), in float32 elsewhere.
    """
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup_frac
    )
    log = log or (lambda msg: print(msg, flush=True))
    start, running, last = time.monotonic(), 0.0, math.nan
    for step in range(cfg.steps):
        ids, labels = next_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            last = running / n
            log(f"step {step + 1}/{cfg.steps} loss {last:.4f} {time.monotonic() - start:.0f}s")
            running = 0.0
    model.eval()
    return last


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 32,
    batch_size: int = 250,
    seed: int = 0,
) -> list[str]:
    """Completions of ``prompts`` (BOS added, left padded), special tokens removed.

    Greedy at ``temperature`` 0, else sampled from the model's distribution at that
    temperature (torch seeded with ``seed``, so a run repeats).
    """
    model.eval()
    tokenizer.padding_side = "left"
    sampled = temperature > 0
    if sampled:
        torch.manual_seed(seed)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=sampled,
            temperature=temperature if sampled else None,
            top_k=0 if sampled else None,
            top_p=1.0 if sampled else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return out


def exact_match(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: Iterable[task.Problem]
) -> float:
    """Fraction of ``problems`` that greedy decoding answers correctly."""
    problems = list(problems)
    texts = generate(model, tokenizer, [task.completion_prompt(p.question) for p in problems])
    return sum(task.check(p, t) for p, t in zip(problems, texts, strict=True)) / len(problems)
