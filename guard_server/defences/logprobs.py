"""Hardening of returned logprobs: keyed noise, order preservation, normalization, quantization.

Each position is processed alone and in constant time, so streaming costs the same per chunk.
The noise for a value is a pure function of (request key, position, token): the same client
asking the same prompt again gets the same numbers, so averaging repeats gains nothing.

A policy may return the sampled token's own value exact when the model was confident in it
(``exact_above``): honest users keep calibrated confidences where the model is near certain,
and such a value tells a distiller little beyond the text, since a near-one-hot target is the
text's own one-hot. The other values are hardened into the mass it leaves.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

# vLLM reports -inf as -9999.0: such values are left alone.
FLOOR = -9999.0
# An exact value is kept at or below this, so the others always have some mass to share:
# vLLM's float32 reports a near-certain token as 0.0 when the rest hold under 2^-24.
NEAR_ONE = math.log1p(-(2.0**-24))
TWO_64 = float(1 << 64)


@lru_cache(maxsize=256)
def keyed_blake2b(key: bytes) -> hashlib.blake2b:
    """A BLAKE2b already keyed with ``key``: copying it skips hashing the key block again
    for every value of a request (the requests in flight each have their own key)."""
    return hashlib.blake2b(key=key, digest_size=16)


def keyed_normal(key: bytes, position: int, token: str) -> float:
    """A standard normal draw that depends only on (key, position, token)."""
    hasher = keyed_blake2b(key).copy()
    hasher.update(position.to_bytes(4, "little") + token.encode())
    digest = hasher.digest()
    u1 = (int.from_bytes(digest[:8], "little") + 0.5) / TWO_64
    u2 = int.from_bytes(digest[8:], "little") / TWO_64
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@dataclass(frozen=True, slots=True)
class LogprobHardening:
    """How one tier's returned logprob values are changed."""

    noise_scale: float = 0.0
    preserve_order: bool = True
    normalize: bool = True
    quantize: Literal["none", "grid", "rank"] = "none"
    grid_step: float = 0.5
    exact_above: float | None = None
    """Return the sampled token's value exact when its probability is at least this (> 0.5,
    so the token is the position's most likely one); ``None``: never."""
    ranked: int | None = None
    """Only this many of a position's most likely tokens keep their rank; the others trade
    values in a keyed order (:meth:`rerank`). ``None``: every token keeps its rank."""

    @property
    def active(self) -> bool:
        """Whether values are changed at all."""
        return self.noise_scale > 0 or self.quantize != "none" or self.ranked is not None

    def rerank(
        self,
        key: bytes,
        position: int,
        tokens: list[str],
        values: list[float],
        pinned: int | None = None,
    ) -> tuple[list[float], list[int]]:
        """The values with every token past the first ``ranked`` given another's, and the
        new rank order (indices into ``tokens``). ``pinned`` keeps its value and rank: the
        sampled token when it is not among the top ones asked for (it is listed last).

        The tail's order is a keyed shuffle: a pure function of (key, position, token), so
        repeating a request returns the same order and averaging repeats undoes nothing.
        The answer keeps its shape (as many values, still sorted), while which of the tail's
        tokens is more likely is no longer in it.
        """
        by_rank = sorted((i for i in range(len(values)) if i != pinned), key=lambda i: -values[i])
        last = [] if pinned is None else [pinned]
        if self.ranked is None or len(by_rank) <= self.ranked:
            return list(values), by_rank + last
        head, tail = by_rank[: self.ranked], by_rank[self.ranked :]
        tail.sort(key=lambda i: keyed_normal(key, position, "\0rank\0" + tokens[i]))
        order = head + tail
        out = list(values)
        for i, value in zip(order, sorted((values[i] for i in by_rank), reverse=True), strict=True):
            out[i] = value
        return out, order + last

    def apply(
        self,
        key: bytes,
        position: int,
        tokens: list[str],
        values: list[float],
        sampled: int | None = None,
    ) -> list[float]:
        """The hardened values for one position's distinct tokens (same order as given).

        ``sampled`` is the index of the sampled token among ``tokens``, if it is there.
        """
        live = [i for i, v in enumerate(values) if v > FLOOR]
        out = list(values)
        if self.quantize == "rank":
            order = sorted(live, key=lambda i: -values[i])
            for rank, i in enumerate(order):
                out[i] = -float(rank)
            return out
        room = 0.0  # log of the mass the hardened values may hold
        if sampled is not None and self._kept_exact(values[sampled]):
            live.remove(sampled)
            out[sampled] = min(values[sampled], NEAR_ONE)
            room = math.log1p(-math.exp(out[sampled]))
        if self.noise_scale > 0:
            for i in live:
                out[i] = values[i] + self.noise_scale * keyed_normal(key, position, tokens[i])
            if self.preserve_order:
                ranked_tokens = sorted(live, key=lambda i: -values[i])
                ranked_values = sorted((out[i] for i in live), reverse=True)
                for i, value in zip(ranked_tokens, ranked_values, strict=True):
                    out[i] = value
        if self.normalize and live:
            top = max(out[i] for i in live)
            total = top + math.log(sum(math.exp(out[i] - top) for i in live))
            shift = max(total - room, 0.0)
            for i in live:
                out[i] = max(min(out[i] - shift, 0.0), FLOOR)
        if self.quantize == "grid":
            step = self.grid_step
            for i in live:
                out[i] = max(
                    min(math.floor(out[i] / step) * step, 0.0), FLOOR
                )  # down: stays a sub-distribution
        return out

    def _kept_exact(self, sampled_value: float) -> bool:
        """Whether the sampled token's value is returned as it is."""
        return self.exact_above is not None and sampled_value >= math.log(self.exact_above)
