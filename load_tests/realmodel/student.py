"""A small from-scratch student of SmolLM2's answers, on the tokens the answers use.

SmolLM2's vocabulary has 49,152 tokens; a student with a full-size output layer spends most of
a CPU step on it. The attacker does what a budget distiller would: keep SmolLM2's tokenizer,
but give the student only the tokens that occur in its data (prompts and answers, a few
thousand), mapped to compact ids. Generated text is mapped back and decoded, so ``trace``
sees ordinary text. Optionally the loss also matches soft labels (returned top-k logprobs):
cross-entropy to the renormalised top-k, for the soft-label comparison.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

IGNORE = -100


@dataclass(frozen=True, slots=True)
class Example:
    """One training example in SmolLM2's token ids, with optional soft labels per answer
    position: ``{token id: logprob}`` of the returned top-k."""

    prompt: list[int]
    answer: list[int]
    soft: list[dict[int, float]] | None = None


@dataclass(frozen=True, slots=True)
class StudentConfig:
    """Size and budget."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    soft_weight: float = 1.0
    seed: int = 0


@dataclass(slots=True)
class Vocab:
    """Compact ids for the SmolLM2 tokens a student ever sees."""

    real: list[int] = field(default_factory=list)
    compact: dict[int, int] = field(default_factory=dict)

    def add(self, ids: Sequence[int]) -> None:
        for token in ids:
            if token not in self.compact:
                self.compact[token] = len(self.real)
                self.real.append(token)

    def encode(self, ids: Sequence[int]) -> list[int]:
        return [self.compact[t] for t in ids if t in self.compact]


def chat_prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """SmolLM2's chat rendering of one user turn, ready for the assistant's answer."""
    text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    return tokenizer.encode(text, add_special_tokens=False).ids


def build_vocab(tokenizer: Tokenizer, examples: Sequence[Example], extra: Sequence[str]) -> Vocab:
    """Every token of the examples (and their soft labels) and of ``extra`` prompts, plus EOS."""
    vocab = Vocab()
    vocab.add([tokenizer.token_to_id("<|im_end|>")])
    for example in examples:
        vocab.add(example.prompt)
        vocab.add(example.answer)
        for soft in example.soft or []:
            vocab.add(list(soft))
    for prompt in extra:
        vocab.add(chat_prompt_ids(tokenizer, prompt))
    return vocab


def _model(vocab: Vocab, cfg: StudentConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(vocab.real),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _batch(examples: Sequence[Example], vocab: Vocab, soft: bool):  # type: ignore[no-untyped-def]
    rows = [(vocab.encode(e.prompt), [*vocab.encode(e.answer), 0], e) for e in examples]
    width = max(len(p) + len(a) for p, a, _ in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    targets: list[tuple[int, int, list[int], list[float]]] = []
    for i, (p, a, example) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        if soft and example.soft:
            for j, dist in enumerate(example.soft[: len(a) - 1]):
                tokens = [vocab.compact[t] for t in dist if t in vocab.compact]
                values = [dist[t] for t in dist if t in vocab.compact]
                if tokens:
                    targets.append((i, len(p) + j - 1, tokens, values))
    return ids, labels, targets


def _soft_loss(logits: torch.Tensor, targets: list) -> torch.Tensor:  # type: ignore[type-arg]
    """Mean cross-entropy from the student to each renormalised returned top-k."""
    width = max(len(t[2]) for t in targets)
    rows = torch.tensor([t[0] for t in targets])
    positions = torch.tensor([t[1] for t in targets])
    tokens = torch.zeros((len(targets), width), dtype=torch.long)
    values = torch.full((len(targets), width), -math.inf)
    for i, (_, _, ids, logps) in enumerate(targets):
        tokens[i, : len(ids)] = torch.tensor(ids)
        values[i, : len(logps)] = torch.tensor(logps)
    target = torch.softmax(values, dim=-1)
    logp = torch.log_softmax(logits[rows, positions], dim=-1).gather(1, tokens)
    return -(target * logp).sum(dim=-1).mean()


def train(
    examples: Sequence[Example], vocab: Vocab, cfg: StudentConfig, soft: bool = False, log=print
) -> LlamaForCausalLM:  # type: ignore[no-untyped-def]
    """Train a fresh student for ``cfg.steps`` AdamW steps (one-cycle schedule)."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = _model(vocab, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    order: list[Example] = []
    started = time.monotonic()
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch:
            order += rng.sample(list(examples), len(examples))
        chunk, order = order[: cfg.batch], order[cfg.batch :]
        ids, labels, targets = _batch(chunk, vocab, soft)
        logits = model(input_ids=ids).logits
        shift = logits[:, :-1].reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1))
        if targets:
            loss = loss + cfg.soft_weight * _soft_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            elapsed = time.monotonic() - started
            log(f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} {elapsed:.0f}s")
    model.eval()
    return model


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    vocab: Vocab,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Sampled answers (T = ``temperature``), mapped back to SmolLM2's tokens and decoded."""
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor([vocab.encode(chat_prompt_ids(tokenizer, prompt))])
        gen = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=0,
            pad_token_id=0,
        )
        new = [vocab.real[t] for t in gen[0, ids.shape[1] :].tolist() if t != 0]
        out.append(tokenizer.decode(new))
    return out


@torch.no_grad()
def nll(model: LlamaForCausalLM, vocab: Vocab, examples: Sequence[Example]) -> float:
    """Mean NLL per answer token (nats) on held-out examples (build the vocabulary with them:
    a token without an id counts as log(vocabulary) + 10)."""
    total, count = 0.0, 0
    for example in examples:
        prompt = vocab.encode(example.prompt)
        answer = [*example.answer, None]
        known = [vocab.compact.get(t, -1) if t is not None else 0 for t in answer]
        ids = torch.tensor([prompt + [max(t, 0) for t in known]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        for j, token in enumerate(known):
            if token < 0:
                total += math.log(len(vocab.real)) + 10
            else:
                total -= float(logp[len(prompt) + j - 1, token])
            count += 1
    return total / max(1, count)
