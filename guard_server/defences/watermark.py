"""KGW green-list watermark detection: a one-sided z-test over unique (context, token) tuples.

The green list is ``defences.hashing.is_green_hashed`` keyed by ``row_key(key, *context)``:
the same rule the vLLM plugin uses when it adds ``delta`` to green logits (context width 1,
the previous token). Each distinct (context, token) tuple is scored once across all the
sequences given, as Sander et al. (2024, "Watermarking Makes Language Models Radioactive")
require for a valid p-value: repeated n-grams are not independent draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guard_server.defences.hashing import green_threshold, is_green_hashed, row_key, token_hash


@dataclass(frozen=True, slots=True)
class WatermarkScore:
    """The test's outcome: z-score, one-sided p-value, tuples scored and how many were green."""

    z: float
    p_value: float
    scored: int
    green: int


def _as_sequences(token_ids: Sequence[int] | Sequence[Sequence[int]]) -> list[np.ndarray]:
    if len(token_ids) == 0:
        return []
    if isinstance(token_ids[0], Sequence | np.ndarray):
        return [np.asarray(seq, dtype=np.int64).reshape(-1) for seq in token_ids]  # type: ignore[arg-type]
    return [np.asarray(token_ids, dtype=np.int64).reshape(-1)]


def _tuples(sequence: np.ndarray, context: int) -> np.ndarray:
    """Rows of ``context`` previous tokens followed by the token, for positions >= context."""
    if len(sequence) <= context:
        return np.empty((0, context + 1), dtype=np.int64)
    return np.lib.stride_tricks.sliding_window_view(sequence, context + 1)


def normal_sf(z: float) -> float:
    """P(N(0, 1) > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def z_score(green: int, scored: int, gamma: float) -> float:
    """KGW's z: (green - gamma T) / sqrt(T gamma (1 - gamma)); 0 when nothing was scored."""
    if scored == 0:
        return 0.0
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1.0 - gamma))


def score(
    token_ids: Sequence[int] | Sequence[Sequence[int]],
    key: int,
    gamma: float = 0.25,
    context: int = 1,
    *,
    vocab_size: int | None = None,
) -> WatermarkScore:
    """Test token ids (one sequence, or a list of sequences) for the watermark of ``key``.

    Position t of a sequence is scored with the ``context`` tokens before it, so the first
    ``context`` tokens of each sequence are only context (prepend the prompt's last token to
    score a completion's first token). ``vocab_size``, when given, rejects out-of-range ids.
    """
    if context < 1:
        raise ValueError("context must be >= 1")
    threshold = green_threshold(gamma)
    sequences = _as_sequences(token_ids)
    for sequence in sequences:
        if sequence.size and (
            sequence.min() < 0 or (vocab_size is not None and sequence.max() >= vocab_size)
        ):
            raise ValueError("token id out of range")
    rows = [_tuples(sequence, context) for sequence in sequences]
    if not rows:
        return WatermarkScore(z=0.0, p_value=0.5, scored=0, green=0)
    unique = np.unique(np.concatenate(rows, axis=0), axis=0)
    keys = row_key(key, *(unique[:, i] for i in range(context)))
    green = int(is_green_hashed(keys, token_hash(unique[:, context]), threshold).sum())
    scored = int(unique.shape[0])
    z = z_score(green, scored, gamma)
    return WatermarkScore(z=z, p_value=normal_sf(z) if scored else 0.5, scored=scored, green=green)
