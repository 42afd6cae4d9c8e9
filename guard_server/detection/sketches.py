"""Distinct counting that forgets: Redis's own HyperLogLog, in process, over time buckets.

The in-process store must count exactly as Redis does, so that one client's traffic scores
the same whichever store holds it. :class:`HyperLogLog` is Redis's HLL (``hyperloglog.c``,
Redis 5 and later): the same hash (MurmurHash64A, seed ``0xadc83b19``), the same 16,384
six-bit registers, the same estimator (Ertl's improved raw estimator), so ``count()`` equals
``PFCOUNT`` of the same items, and the union over buckets equals ``PFCOUNT`` of their keys.

:class:`WindowedDistinct` keeps one HLL per time bucket and counts the union of the buckets
of a sliding window; whole buckets are dropped as they leave it (Redis: the bucket keys
expire), so nothing is counted forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from guard_server.detection.profile import Window

_P = 14
REGISTERS = 1 << _P
_Q = 64 - _P
_MASK64 = (1 << 64) - 1
_M = 0xC6A4A7935BD1E995
_SEED = 0xADC83B19
_ALPHA_INF = 0.5 / math.log(2)
_SPARSE_MAX = 64
"""Registers an HLL keeps in a dict before it switches to 16 KiB of registers (a dict of 64
small ints takes about as much memory as 4 KiB)."""


def murmur64a(data: bytes, seed: int = _SEED) -> int:
    """Redis's MurmurHash64A (``hyperloglog.c``), as an unsigned 64-bit integer."""
    length = len(data)
    h = (seed ^ (length * _M)) & _MASK64
    whole = length - (length & 7)
    for start in range(0, whole, 8):
        k = int.from_bytes(data[start : start + 8], "little")
        k = (k * _M) & _MASK64
        k ^= k >> 47
        k = (k * _M) & _MASK64
        h ^= k
        h = (h * _M) & _MASK64
    tail = data[whole:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * _M) & _MASK64
    h ^= h >> 47
    h = (h * _M) & _MASK64
    h ^= h >> 47
    return h


@lru_cache(maxsize=1 << 14)
def register_of(item: str) -> tuple[int, int]:
    """The register an item lands in and the value it offers there (``hllPatLen``). Cached:
    a client's own id comes with each of its requests, and popular prompts repeat."""
    h = murmur64a(item.encode())
    index = h & (REGISTERS - 1)
    rest = (h >> _P) | (1 << _Q)
    return index, (rest & -rest).bit_length()  # trailing zeros + 1


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if previous == z:
            return z / 3.0


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        previous = z
        z += x * y
        y += y
        if previous == z:
            return z


@lru_cache(maxsize=REGISTERS + 1)
def _sigma_term(zeros: int) -> float:
    """``m * sigma(zeros / m)``: one value per count of empty registers, computed once."""
    m = float(REGISTERS)
    return m * _sigma(zeros / m)


def estimate(histogram: list[int]) -> int:
    """Redis's ``hllCount`` from a histogram of register values (index 0..Q+1)."""
    return _estimate(tuple(histogram))


@lru_cache(maxsize=4096)
def _estimate(histogram: tuple[int, ...]) -> int:
    """:func:`estimate`, cached: a young client's day and week windows and its campaign's
    prompts often hold the same registers, so one request asks for the same count 2-3 times."""
    m = float(REGISTERS)
    top = _Q
    if not histogram[_Q + 1]:  # then z is 0 until the highest value held: skip to it
        while top and not histogram[top]:
            top -= 1
    z = m * _tau((m - histogram[_Q + 1]) / m)
    for value in range(top, 0, -1):
        z += histogram[value]
        z *= 0.5
    z += _sigma_term(histogram[0])
    return math.floor(_ALPHA_INF * m * m / z + 0.5)  # llroundl


class HyperLogLog:
    """One HLL's registers: a dict of the set ones while few, then 16 KiB (as Redis keeps a
    sparse and a dense encoding)."""

    __slots__ = ("_dense", "_sparse")

    def __init__(self) -> None:
        self._sparse: dict[int, int] | None = {}
        self._dense: bytearray | None = None

    def get(self, index: int) -> int:
        """Register ``index``."""
        if self._sparse is not None:
            return self._sparse.get(index, 0)
        assert self._dense is not None
        return self._dense[index]

    def add(self, index: int, value: int) -> bool:
        """Offer ``value`` to register ``index``; whether the register rose."""
        sparse = self._sparse
        if sparse is None:
            dense = self._dense
            assert dense is not None
            if dense[index] >= value:
                return False
            dense[index] = value
            return True
        if sparse.get(index, 0) >= value:
            return False
        sparse[index] = value
        if len(sparse) > _SPARSE_MAX:
            self._dense = bytearray(self.array().tobytes())
            self._sparse = None
        return True

    def array(self) -> np.ndarray:
        """All registers as an array (a view of the dense registers, or a new array)."""
        if self._sparse is None:
            assert self._dense is not None
            return np.frombuffer(self._dense, dtype=np.uint8)
        dense = np.zeros(REGISTERS, dtype=np.uint8)
        if self._sparse:
            dense[list(self._sparse)] = list(self._sparse.values())
        return dense

    def histogram(self) -> list[int]:
        """How many registers hold each value 0..Q+1."""
        if self._sparse is None:
            return np.bincount(self.array(), minlength=_Q + 2).tolist()
        histogram = [0] * (_Q + 2)
        histogram[0] = REGISTERS - len(self._sparse)
        for value in self._sparse.values():
            histogram[value] += 1
        return histogram

    def count(self) -> int:
        """``PFCOUNT`` of this HLL."""
        return estimate(self.histogram())

    @classmethod
    def union(cls, parts: list[HyperLogLog]) -> HyperLogLog:
        """One HLL holding the largest value of each register over ``parts``."""
        merged = cls()
        if all(part._sparse is not None for part in parts):
            for part in parts:
                assert part._sparse is not None
                for index, value in part._sparse.items():
                    merged.add(index, value)
            return merged
        registers = np.zeros(REGISTERS, dtype=np.uint8)
        for part in parts:
            np.maximum(registers, part.array(), out=registers)
        merged._sparse, merged._dense = None, bytearray(registers.tobytes())
        return merged


@dataclass(slots=True)
class WindowedDistinct:
    """Distinct items over a sliding :class:`Window`, as Redis counts them with one HLL key
    per bucket (``PFCOUNT`` of the window's keys). The union of the window's buckets and its
    histogram are kept up to date as items come, and rebuilt only when a bucket leaves the
    window, so counting costs no more than the estimator."""

    window: Window
    _hlls: dict[int, HyperLogLog] = field(default_factory=dict)
    _union: HyperLogLog | None = None
    _histogram: list[int] = field(default_factory=list)
    _estimate: int | None = None
    _window_start: int = 0
    _counts: dict[int, int] = field(default_factory=dict)  # items added per bucket

    def _slide(self, current: int) -> HyperLogLog:
        start = current - self.window.buckets + 1
        if self._union is not None and start == self._window_start:
            return self._union
        for old in [b for b in self._hlls if b < start]:
            del self._hlls[old]
        for old in [b for b in self._counts if b < start]:
            del self._counts[old]
        union = self._union = HyperLogLog.union(list(self._hlls.values()))
        self._histogram = union.histogram()
        self._estimate = None
        self._window_start = start
        return union

    def add(self, now: float, registers: list[tuple[int, int]]) -> None:
        """Count one request's items (given as :func:`register_of` pairs) at ``now``."""
        window = self.window
        current = int(now // window.bucket_s)  # window.bucket_of(now), inlined: per request
        union = self._union
        if union is None or current - window.buckets + 1 != self._window_start:
            union = self._slide(current)
        hll = self._hlls.get(current)
        if hll is None:
            hll = self._hlls[current] = HyperLogLog()
        counts = self._counts
        counts[current] = counts.get(current, 0) + len(registers)
        histogram = self._histogram
        # If an add below turns the registers dense, `sparse` stays as it was: each of its
        # values is still at most the register's, so what it skips add would not raise.
        sparse = hll._sparse
        for index, value in registers:
            if sparse is not None and sparse.get(index, 0) >= value:
                continue  # HyperLogLog.add would not raise it (a repeat, most often)
            if hll.add(index, value):
                old = union.get(index)
                if value > old:
                    union.add(index, value)
                    histogram[old] -= 1
                    histogram[value] += 1
                    self._estimate = None

    def distinct(self, now: float) -> int:
        """Estimated distinct items in the window ending at ``now``."""
        self._slide(self.window.bucket_of(now))
        if self._estimate is None:
            self._estimate = estimate(self._histogram)
        return self._estimate

    def items(self, now: float) -> int:
        """Items added in the window ending at ``now`` (repeats included)."""
        self._slide(self.window.bucket_of(now))
        return sum(self._counts.values())
