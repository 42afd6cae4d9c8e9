"""Logprob hardening of many positions at once: :meth:`LogprobHardening.apply` and
:meth:`LogprobHardening.rerank` over a whole response's positions with numpy, giving the same
values bit for bit as one position at a time (tests/defences/test_logprob_batch.py compares
them over random inputs). Each row is one position, hardened as if alone: a streamed chunk's
positions get the values they get in the whole response.

Two parts stay per value, so that no value changes:

- the keyed BLAKE2b of each (key, position, token): the noise is defined by it, and hashlib
  has no batch call;
- ``log``, ``cos``, ``exp`` and ``log1p`` run through Python's ``math`` (the C library) over
  lists: numpy's float64 versions are SIMD code on some CPUs (AVX-512) and can differ from the
  C library in the last bit.

Everything else runs over the arrays: Box–Muller's arithmetic, order preservation, the
normalizing sum (left to right, as Python's ``sum``), the shift, clamps and grid, with
Python's ``min``/``max`` semantics (the first of equal values, so signed zeros stay as they
were). Values are assumed not NaN, as vLLM never returns NaN (``-inf`` comes as ``FLOOR``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from numpy.typing import NDArray

from guard_server.defences.logprobs import (
    FLOOR,
    NEAR_ONE,
    TWO_64,
    LogprobHardening,
    keyed_blake2b,
)

Floats = NDArray[np.float64]
Indices = NDArray[np.intp]
Mask = NDArray[np.bool_]

_RANK_SALT = "\0rank\0"  # rerank's draws, apart from the noise's


@dataclass(frozen=True, slots=True)
class Positions:
    """Many positions' distinct tokens and values, one row each, padded to one width."""

    positions: list[int]
    tokens: Sequence[Sequence[str]]
    values: Floats
    """(rows, width); NaN past a row's own tokens."""
    present: Mask
    """Where a row has a token."""

    @classmethod
    def of(
        cls,
        positions: Sequence[int],
        tokens: Sequence[Sequence[str]],
        values: Sequence[Sequence[float]],
    ) -> Positions:
        """The rows ``(positions[r], tokens[r], values[r])``."""
        widths = np.fromiter(map(len, tokens), dtype=np.intp, count=len(tokens))
        present = np.arange(int(widths.max(initial=0))) < widths[:, None]
        matrix = np.full(present.shape, np.nan)
        matrix[present] = np.fromiter(
            chain.from_iterable(values), dtype=np.float64, count=int(widths.sum())
        )
        return cls(list(positions), tokens, matrix, present)

    def with_values(self, values: Floats) -> Positions:
        """The same rows with other values."""
        return Positions(self.positions, self.tokens, values, self.present)


def keyed_normals(key: bytes, positions: Sequence[int], tokens: Sequence[str]) -> Floats:
    """``keyed_normal(key, positions[i], tokens[i])`` for every ``i``, bit for bit."""
    base = keyed_blake2b(key)
    digests = bytearray()
    last = None
    for position, token in zip(positions, tokens, strict=True):
        if position != last:  # a run of one position's tokens shares its prefix
            at_position = base.copy()
            at_position.update(position.to_bytes(4, "little"))
            last = position
        hasher = at_position.copy()
        hasher.update(token.encode())
        digests += hasher.digest()
    words = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    # uint64 -> float64 rounds to nearest, as Python's int -> float does.
    u1 = (words[:, 0].astype(np.float64) + 0.5) / TWO_64
    u2 = words[:, 1].astype(np.float64) / TWO_64
    return np.sqrt(-2.0 * _libm(math.log, u1)) * _libm(math.cos, 2.0 * math.pi * u2)


def apply_many(
    hardening: LogprobHardening, key: bytes, batch: Positions, sampled: Indices
) -> Floats:
    """Every row's :meth:`LogprobHardening.apply`; ``sampled[r]``: the index of row ``r``'s
    sampled token, or -1."""
    values = batch.values
    out = values.copy()
    if values.size == 0:
        return out
    live = batch.present & (values > FLOOR)
    if hardening.quantize == "rank":
        ranks = np.broadcast_to(-np.arange(values.shape[1], dtype=np.float64), values.shape)
        by_rank = np.empty_like(out)
        np.put_along_axis(by_rank, _order(-values, live), ranks, axis=1)
        return np.where(live, by_rank, out)
    room = np.zeros(len(values))  # log of the mass the hardened values may hold
    if hardening.exact_above is not None:
        rows = np.flatnonzero(sampled >= 0)
        exact = values[rows, sampled[rows]]
        kept = exact >= math.log(hardening.exact_above)
        rows, exact = rows[kept], exact[kept]
        exact = np.where(exact > NEAR_ONE, NEAR_ONE, exact)  # min(value, NEAR_ONE)
        out[rows, sampled[rows]] = exact
        live[rows, sampled[rows]] = False
        room[rows] = _libm(_log_rest, exact)
    if hardening.noise_scale > 0:
        rows, cols = np.nonzero(live)
        draws = keyed_normals(
            key,
            [batch.positions[r] for r in rows.tolist()],
            [batch.tokens[r][c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)],
        )
        out[rows, cols] = values[rows, cols] + hardening.noise_scale * draws
        if hardening.preserve_order:
            # Both orders list the other tokens last in index order: they keep their values.
            noisy_sorted = np.take_along_axis(out, _order(-out, live), axis=1)
            np.put_along_axis(out, _order(-values, live), noisy_sorted, axis=1)
    if hardening.normalize:
        out = _normalized(out, live, room)
    if hardening.quantize == "grid":
        step = hardening.grid_step
        # + 0.0: math.floor returns an int, which has no -0.
        grid = _clamped((np.floor(out / step) + 0.0) * step)
        out = np.where(live, grid, out)
    return out


def rerank_many(
    hardening: LogprobHardening, key: bytes, batch: Positions, pinned: Indices
) -> tuple[Floats, Indices]:
    """Every row's :meth:`LogprobHardening.rerank`: its values, and its rank order (indices
    into the row's tokens; past a row's width, its padding). ``pinned[r]``: the index of row
    ``r``'s pinned token, or -1."""
    values = batch.values
    ranking = batch.present.copy()
    rows = np.flatnonzero(pinned >= 0)
    ranking[rows, pinned[rows]] = False
    by_rank = _order(-values, ranking)
    counts = ranking.sum(axis=1)[:, None]
    slots = np.arange(values.shape[1])
    head = slots < (counts if hardening.ranked is None else np.minimum(hardening.ranked, counts))
    tail = ~head & (slots < counts)
    rows, cols = np.nonzero(tail)
    draws = np.full(values.shape, -np.inf)  # the head first, in its order
    draws[rows, cols] = keyed_normals(
        key,
        [batch.positions[r] for r in rows.tolist()],
        [
            _RANK_SALT + batch.tokens[r][i]
            for r, i in zip(rows.tolist(), by_rank[rows, cols].tolist(), strict=True)
        ],
    )
    order = np.take_along_axis(by_rank, _order(draws, head | tail), axis=1)
    out = values.copy()
    # by_rank lists the values in descending order; the other tokens keep theirs.
    np.put_along_axis(out, order, np.take_along_axis(values, by_rank, axis=1), axis=1)
    return out, order


def listed_order(hardened: Floats, order: Indices, present: Mask) -> Indices:
    """Per row, the order to list a reranked answer's tokens in: by hardened value, ties in
    rank ``order`` (``sorted(key=lambda i: (-hardened[i], place[i]))`` one row at a time)."""
    in_order = np.take_along_axis(present, order, axis=1)
    by_value = _order(-np.take_along_axis(hardened, order, axis=1), in_order)
    return np.take_along_axis(order, by_value, axis=1)


def _order(keys: Floats, among: Mask) -> Indices:
    """Per row, the indices in ``among`` by ascending key, ties in index order (as a stable
    ``sorted``), then the others in index order."""
    order = np.argsort(np.where(among, keys, np.inf), axis=1, kind="stable")
    others = np.take_along_axis(~among, order, axis=1)
    return np.take_along_axis(order, np.argsort(others, axis=1, kind="stable"), axis=1)


def _normalized(out: Floats, live: Mask, room: Floats) -> Floats:
    """The live values shifted so that their mass is at most ``exp(room)``, clamped."""
    # The top's sign, were it zero, changes nothing below: no need for max()'s first of equals.
    top = np.max(np.where(live, out, -np.inf), axis=1, initial=-np.inf)
    rows, cols = np.nonzero(live)
    exps = np.zeros_like(out)
    exps[rows, cols] = _libm(math.exp, out[rows, cols] - top[rows])
    mass = np.zeros(len(out))
    for column in exps.T:  # sum(): left to right
        mass = mass + column
    rows = np.flatnonzero(live.any(axis=1))
    shift = np.zeros(len(out))
    shift[rows] = top[rows] + _libm(math.log, mass[rows]) - room[rows]
    shift = np.where(shift < 0.0, 0.0, shift)  # max(shift, 0.0)
    return np.where(live, _clamped(out - shift[:, None]), out)


def _clamped(values: Floats) -> Floats:
    """``max(min(value, 0.0), FLOOR)`` elementwise."""
    values = np.where(values > 0.0, 0.0, values)
    return np.where(values < FLOOR, FLOOR, values)


def _log_rest(value: float) -> float:
    """The log of the mass a token of logprob ``value`` leaves to the others."""
    return math.log1p(-math.exp(value))


def _libm(function: Callable[[float], float], values: Floats) -> Floats:
    """``function`` (a C library one, through ``math``) of each value."""
    return np.fromiter(map(function, values.tolist()), dtype=np.float64, count=values.size)
