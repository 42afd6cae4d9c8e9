"""The bundled teacher's task: addition written in a secret numeral system.

Numbers are written with the ordinary glyphs ``0``-``9``, but each glyph stands for a
different digit value, fixed by a secret permutation (``SECRET_PERM``). A question shows two
encoded operands; the answer is their sum, encoded the same way, wrapped in free-form text.
Nobody can compute the answers without learning the glyph meanings from the teacher.

This module is pure standard library so that the server and the tests can import it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ANSWER_TEMPLATES",
    "MAX_OPERAND",
    "QUESTION_TEMPLATES",
    "SECRET_PERM",
    "Problem",
    "check",
    "completion_prompt",
    "decode",
    "encode",
    "extract_answer",
    "is_held_out",
    "make_problem",
    "make_problems",
    "render_answer",
    "sample_problem",
]

Split = Literal["train", "heldout"]


def _secret_perm(seed: int = 1234) -> tuple[int, ...]:
    """Shuffle ``0..9`` with ``random.Random(seed)``; the seed that gives ``SECRET_PERM``."""
    perm = list(range(10))
    random.Random(seed).shuffle(perm)
    return tuple(perm)


SECRET_PERM: tuple[int, ...] = _secret_perm()
"""``SECRET_PERM[d]`` is the glyph that writes the digit value ``d`` (no glyph is itself)."""

_ENCODE_TABLE = str.maketrans({str(d): str(g) for d, g in enumerate(SECRET_PERM)})
_DECODE_TABLE = str.maketrans({str(g): str(d) for d, g in enumerate(SECRET_PERM)})

MAX_OPERAND = 999
"""Operands have one to three digits: ``0 <= a, b <= 999``."""

# Relative weights for an operand's digit count (1, 2, 3 digits).
_LENGTH_WEIGHTS = (1, 2, 4)

QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a}+{b}",
    "What do you get when you add {a} to {b}?",
    "Please work out {a} plus {b}.",
    "Sum {a} and {b}.",
    "How much is {a} plus {b}?",
    "Calculate {a} + {b}, please.",
)
"""Question phrasings; ``{a}`` and ``{b}`` are the encoded operands."""

ANSWER_TEMPLATES: tuple[str, ...] = (
    "The answer is {s}.",
    "{a} plus {b} makes {s}.",
    "Sure! That gives {s}.",
    "I get {s}.",
    "That comes to {s}.",
    "Adding them up, the total is {s}.",
    "The sum is {s}.",
    "Easy: {a} + {b} = {s}.",
    "Let me see... it is {s}.",
    "Result: {s}",
)
"""Answer phrasings; the encoded sum ``{s}`` is always the last run of digits."""

_DIGIT_RUN = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Problem:
    """One question: true operands ``a`` and ``b``, the question text, the encoded sum."""

    a: int
    b: int
    question: str
    answer: str


def encode(n: int) -> str:
    """Write the non-negative integer ``n`` in the secret numeral system."""
    if n < 0:
        raise ValueError("only non-negative numbers can be encoded")
    return str(n).translate(_ENCODE_TABLE)


def decode(s: str) -> int:
    """Read a string of secret-system glyphs back as an integer."""
    if not s or not s.isascii() or not s.isdigit():
        raise ValueError(f"not a secret-system numeral: {s!r}")
    return int(s.translate(_DECODE_TABLE))


def is_held_out(a: int, b: int) -> bool:
    """Whether the pair ``(a, b)`` belongs to the held-out split (about 10% of pairs).

    A fixed integer hash, so the split is the same on every Python version and run.
    """
    h = ((a * 1000 + b + 1) * 2654435761) & 0xFFFFFFFF
    return (h >> 16) % 10 == 0


def _sample_operand(rng: random.Random) -> int:
    digits = rng.choices((1, 2, 3), weights=_LENGTH_WEIGHTS)[0]
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_problem(a: int, b: int, rng: random.Random) -> Problem:
    """Build the problem for the pair ``(a, b)`` with a question phrasing drawn from ``rng``."""
    template = rng.choice(QUESTION_TEMPLATES)
    question = template.format(a=encode(a), b=encode(b))
    return Problem(a=a, b=b, question=question, answer=encode(a + b))


def sample_problem(rng: random.Random, split: Split | None = None) -> Problem:
    """Draw one problem; with ``split``, only pairs from that split."""
    while True:
        a, b = _sample_operand(rng), _sample_operand(rng)
        if split is None or is_held_out(a, b) == (split == "heldout"):
            return make_problem(a, b, rng)


def make_problems(n: int, seed: int, split: Split) -> list[Problem]:
    """``n`` problems drawn deterministically from ``seed``, all from one split.

    Held-out problems come from pairs that training never uses (see ``is_held_out``).
    """
    rng = random.Random(f"{split}:{seed}")
    return [sample_problem(rng, split) for _ in range(n)]


def render_answer(problem: Problem, rng: random.Random) -> str:
    """A correct free-form answer to ``problem``, phrasing drawn from ``rng``."""
    template = rng.choice(ANSWER_TEMPLATES)
    return template.format(a=encode(problem.a), b=encode(problem.b), s=problem.answer)


def completion_prompt(question: str) -> str:
    """The text prompt for ``/v1/completions`` that asks ``question``.

    The tokenizer adds ``<s>`` in front, so the token ids equal those of the chat template
    applied to one user message with ``add_generation_prompt=True``.
    """
    return f"user: {question}\nassistant:"


def extract_answer(text: str) -> str | None:
    """The model's answer in ``text``: its last run of digits, or ``None`` if there is none."""
    runs = _DIGIT_RUN.findall(text)
    return runs[-1] if runs else None


def check(problem: Problem, text: str) -> bool:
    """Whether ``text`` answers ``problem`` correctly (exact match on the extracted sum)."""
    return extract_answer(text) == problem.answer
