"""The vectorised hardening gives every position the values the per-position one gives it,
bit for bit (signed zeros included), over random policies, positions and values: ties, exact
zeros, ``FLOOR`` and ``-inf``, confident sampled tokens, pinned ones."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard_server.defences.logprob_batch import (
    Positions,
    apply_many,
    keyed_normals,
    listed_order,
    rerank_many,
)
from guard_server.defences.logprobs import FLOOR, NEAR_ONE, LogprobHardening, keyed_normal

EXAMPLES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = b"k" * 32

# A small pool makes ties between a position's values frequent.
special = st.sampled_from(
    [0.0, -0.0, FLOOR, -math.inf, NEAR_ONE, math.log(0.95), math.log(0.5), -0.5, -1.0, -20.0]
)
value = st.one_of(special, st.floats(min_value=-40, max_value=0, allow_nan=False))
token = st.text(max_size=4)


@st.composite
def position(draw: st.DrawFn) -> tuple[int, list[str], list[float], int | None]:
    """One position: its index, distinct tokens, their values, and a token index or None."""
    tokens = draw(st.lists(token, min_size=1, max_size=21, unique=True))
    values = draw(st.lists(value, min_size=len(tokens), max_size=len(tokens)))
    index = draw(st.one_of(st.none(), st.integers(0, len(tokens) - 1)))
    return draw(st.integers(0, 2**32 - 1)), tokens, values, index


hardenings = st.builds(
    LogprobHardening,
    noise_scale=st.one_of(st.just(0.0), st.floats(min_value=0.01, max_value=5)),
    preserve_order=st.booleans(),
    normalize=st.booleans(),
    quantize=st.sampled_from(["none", "grid", "rank"]),
    grid_step=st.one_of(st.just(0.5), st.floats(min_value=0.01, max_value=2)),
    exact_above=st.one_of(st.none(), st.floats(min_value=0.51, max_value=0.999)),
    ranked=st.one_of(st.none(), st.integers(0, 6)),
)
batches = st.lists(position(), max_size=12)


def _bits(values: list[float]) -> list[str]:
    """Each value's exact bits (``-0.0`` apart from ``0.0``)."""
    return [v.hex() for v in values]


def _indices(rows: list[tuple[int, list[str], list[float], int | None]]) -> np.ndarray:
    return np.array([-1 if index is None else index for *_, index in rows], dtype=np.intp)


def _batch(rows: list[tuple[int, list[str], list[float], int | None]]) -> Positions:
    return Positions.of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


@EXAMPLES
@given(hardening=hardenings, rows=batches)
def test_apply_many_is_apply_per_position(
    hardening: LogprobHardening, rows: list[tuple[int, list[str], list[float], int | None]]
) -> None:
    many = apply_many(hardening, KEY, _batch(rows), _indices(rows)).tolist()
    for (pos, tokens, values, sampled), got in zip(rows, many, strict=True):
        expected = hardening.apply(KEY, pos, tokens, values, sampled)
        assert _bits(got[: len(tokens)]) == _bits(expected)


@EXAMPLES
@given(hardening=hardenings, rows=batches)
def test_rerank_many_is_rerank_per_position(
    hardening: LogprobHardening, rows: list[tuple[int, list[str], list[float], int | None]]
) -> None:
    values, orders = rerank_many(hardening, KEY, _batch(rows), _indices(rows))
    for (pos, tokens, raw, pinned), got, order in zip(
        rows, values.tolist(), orders.tolist(), strict=True
    ):
        expected, expected_order = hardening.rerank(KEY, pos, tokens, raw, pinned)
        assert _bits(got[: len(tokens)]) == _bits(expected)
        assert order[: len(tokens)] == expected_order


@EXAMPLES
@given(hardening=hardenings, rows=batches)
def test_listed_order_is_the_per_position_listing(
    hardening: LogprobHardening, rows: list[tuple[int, list[str], list[float], int | None]]
) -> None:
    """The order a reranked answer lists its tokens in: by hardened value, ties in rank order."""
    batch, index = _batch(rows), _indices(rows)
    reranked, orders = rerank_many(hardening, KEY, batch, index)
    hardened = apply_many(hardening, KEY, batch.with_values(reranked), index)
    listings = listed_order(hardened, orders, batch.present).tolist()
    for (_, tokens, *_), values, order, listing in zip(
        rows, hardened.tolist(), orders.tolist(), listings, strict=True
    ):
        place = {i: rank for rank, i in enumerate(order[: len(tokens)])}
        expected = sorted(range(len(tokens)), key=lambda i: (-values[i], place[i]))
        assert listing[: len(tokens)] == expected


@EXAMPLES
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), token), max_size=50))
def test_keyed_normals_are_keyed_normal(pairs: list[tuple[int, str]]) -> None:
    positions, tokens = [p for p, _ in pairs], [t for _, t in pairs]
    expected = [keyed_normal(KEY, p, t) for p, t in pairs]
    assert _bits(keyed_normals(KEY, positions, tokens).tolist()) == _bits(expected)


def test_uint64_to_float_rounds_as_python_does() -> None:
    """The noise's uniforms come from 64-bit words: numpy's conversion must round halfway
    cases (to even) and carries as Python's int -> float does."""
    words = [2**64 - 1, 2**63 + 2**10, 2**63 + 3 * 2**10, 2**53 + 1, 2**53 + 3, 2**63 - 1, 0, 1]
    words += [2**63 + 2**10 + 1, 2**62 + 2**9, 2**62 + 3 * 2**9]
    got = np.array(words, dtype=np.uint64).astype(np.float64).tolist()
    assert _bits(got) == _bits([float(w) for w in words])


def test_an_empty_batch_hardens_to_nothing() -> None:
    hardening = LogprobHardening(noise_scale=1.0, quantize="grid", exact_above=0.9, ranked=1)
    empty = Positions.of([], [], [])
    assert apply_many(hardening, KEY, empty, np.array([], dtype=np.intp)).shape == (0, 0)
    assert rerank_many(hardening, KEY, empty, np.array([], dtype=np.intp))[1].shape == (0, 0)
