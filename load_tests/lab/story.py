"""The storyteller's task: stories from a secret word chain, text with entropy to mark.

The bundled teacher's answers have almost no entropy (a near-certain sum in one of ten
phrasings), so neither a watermark nor soft labels have anything to act on there. The
storyteller is a second lab model with the opposite property: asked for a story about a word,
it continues with words drawn from a fixed, secret first-order chain over 176 English words,
each word followed by one of ``SUCCESSORS`` words with Zipf-like probabilities (about 4 bits
of choice per word). Its text is as free as the chain allows, and every word transition can be
checked against the chain, so the fidelity of a generation is measurable.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import cache

from guard_server.teacher.task import completion_prompt
from load_tests.lab.train_teacher import _ENGLISH

WORDS: tuple[str, ...] = tuple(sorted(set(_ENGLISH.split())))
"""The chain's words (the English of the bundled tokenizer's corpus)."""

SUCCESSORS = 24
ZIPF = 0.8
STORY_WORDS = 30
"""Words per story after the topic word; the story then ends with a full stop."""


@dataclass(frozen=True, slots=True)
class Chain:
    """The secret word chain: each word's successors and their probabilities."""

    successors: dict[str, tuple[str, ...]]
    probs: dict[str, tuple[float, ...]]

    def prob(self, word: str, nxt: str) -> float:
        """P(nxt | word) under the chain (0 for a transition the chain never makes)."""
        try:
            return self.probs[word][self.successors[word].index(nxt)]
        except (KeyError, ValueError):
            return 0.0


@cache
def chain(seed: int = 2024) -> Chain:
    """The chain of ``seed`` (the storyteller is trained on seed 2024)."""
    rng = random.Random(f"story-chain:{seed}")
    weights = [1.0 / (rank + 1) ** ZIPF for rank in range(SUCCESSORS)]
    total = sum(weights)
    probs = tuple(w / total for w in weights)
    successors = {word: tuple(rng.sample(WORDS, SUCCESSORS)) for word in WORDS}
    return Chain(successors, {word: probs for word in WORDS})


def prompt(topic: str) -> str:
    """The ``/v1/completions`` prompt asking for a story about ``topic``."""
    return completion_prompt(f"Tell a story about {topic}.")


def sample_story(topic: str, rng: random.Random, words: int = STORY_WORDS) -> str:
    """A story as the chain tells it: the topic word, ``words`` more words, a full stop."""
    c = chain()
    out = [topic]
    for _ in range(words):
        word = out[-1]
        out.append(rng.choices(c.successors[word], weights=c.probs[word])[0])
    return " " + " ".join(out) + "."


def topics(n: int, seed: int) -> list[str]:
    """``n`` topic words drawn with replacement, deterministically from ``seed``."""
    rng = random.Random(f"story-topics:{seed}")
    return [rng.choice(WORDS) for _ in range(n)]


@dataclass(frozen=True, slots=True)
class Fidelity:
    """How well generations follow the chain."""

    transitions: int
    valid: float  # share of word transitions the chain can make
    nll: float  # mean -log P(next | word) over the valid transitions, nats


def fidelity(topics_: list[str], texts: list[str]) -> Fidelity:
    """Score each text as the continuation of a story about its topic."""
    c = chain()
    total = valid = 0
    nll = 0.0
    for topic, text in zip(topics_, texts, strict=True):
        words = text.replace(".", " ").split()
        sequence = words if words[:1] == [topic] else [topic, *words]
        for word, nxt in itertools.pairwise(sequence):
            total += 1
            p = c.prob(word, nxt)
            if p > 0:
                valid += 1
                nll -= math.log(p)
    return Fidelity(total, valid / total if total else 0.0, nll / valid if valid else math.nan)


def entropy() -> float:
    """The chain's entropy per word transition, nats (the floor of any model's NLL)."""
    probs = chain().probs[WORDS[0]]
    return -sum(p * math.log(p) for p in probs)
