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

import numpy as np

from guard_server.detection.profile import Window

_P = 14
REGISTERS = 1 << _P
_Q = 64 - _P
_MASK64 = (1 << 64) - 1
_M = 0xC6A4A7935BD1E995
_SEED = 0xADC83B19
_ALPHA_INF = 0.5 / math.log(2)
_SPARSE_MAX = 256
"""Registers a bucket keeps in a dict before it switches to a dense array."""


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


def register_of(item: str) -> tuple[int, int]:
    """The register an item lands in and the value it offers there (``hllPatLen``)."""
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


def estimate(histogram: np.ndarray) -> int:
    """Redis's ``hllCount`` from a histogram of register values (index 0..Q+1)."""
    m = float(REGISTERS)
    z = m * _tau((m - float(histogram[_Q + 1])) / m)
    for value in range(_Q, 0, -1):
        z += float(histogram[value])
        z *= 0.5
    z += m * _sigma(float(histogram[0]) / m)
    return math.floor(_ALPHA_INF * m * m / z + 0.5)  # llroundl


class HyperLogLog:
    """One HLL: sparse (a dict of set registers) while small, then 16 KiB of registers."""

    __slots__ = ("_dense", "_sparse")

    def __init__(self) -> None:
        self._sparse: dict[int, int] | None = {}
        self._dense: np.ndarray | None = None

    def add(self, index: int, value: int) -> bool:
        """Offer ``value`` to register ``index``; whether the register rose."""
        sparse = self._sparse
        if sparse is not None:
            if sparse.get(index, 0) >= value:
                return False
            sparse[index] = value
            if len(sparse) > _SPARSE_MAX:
                self._dense = self.registers()
                self._sparse = None
            return True
        dense = self._dense
        assert dense is not None
        if dense[index] >= value:
            return False
        dense[index] = value
        return True

    def registers(self) -> np.ndarray:
        """All registers as an array (a copy while sparse)."""
        if self._dense is not None:
            return self._dense
        dense = np.zeros(REGISTERS, dtype=np.uint8)
        assert self._sparse is not None
        if self._sparse:
            dense[list(self._sparse)] = list(self._sparse.values())
        return dense

    def count(self) -> int:
        """``PFCOUNT`` of this HLL."""
        return estimate(np.bincount(self.registers(), minlength=_Q + 2))


@dataclass(slots=True)
class WindowedDistinct:
    """Distinct items over a sliding :class:`Window`, as Redis counts them with one HLL key
    per bucket (``PFCOUNT`` of the window's keys)."""

    window: Window
    _hlls: dict[int, HyperLogLog] = field(default_factory=dict)
    _union: np.ndarray | None = None  # registers of the union of the window's buckets
    _histogram: np.ndarray | None = None
    _window_start: int = 0
    _counts: dict[int, int] = field(default_factory=dict)  # items added per bucket

    def _slide(self, current: int) -> None:
        start = current - self.window.buckets + 1
        if self._union is not None and start == self._window_start:
            return
        for old in [b for b in self._hlls if b < start]:
            del self._hlls[old]
        for old in [b for b in self._counts if b < start]:
            del self._counts[old]
        union = np.zeros(REGISTERS, dtype=np.uint8)
        for hll in self._hlls.values():
            np.maximum(union, hll.registers(), out=union)
        self._union = union
        self._histogram = np.bincount(union, minlength=_Q + 2)
        self._window_start = start

    def add(self, now: float, registers: list[tuple[int, int]]) -> None:
        """Count one request's items (given as :func:`register_of` pairs) at ``now``."""
        current = self.window.bucket_of(now)
        self._slide(current)
        hll = self._hlls.get(current)
        if hll is None:
            hll = self._hlls[current] = HyperLogLog()
        self._counts[current] = self._counts.get(current, 0) + len(registers)
        union, histogram = self._union, self._histogram
        assert union is not None and histogram is not None
        for index, value in registers:
            if hll.add(index, value) and value > union[index]:
                histogram[union[index]] -= 1
                histogram[value] += 1
                union[index] = value

    def distinct(self, now: float) -> int:
        """Estimated distinct items in the window ending at ``now``."""
        self._slide(self.window.bucket_of(now))
        assert self._histogram is not None
        return estimate(self._histogram)

    def items(self, now: float) -> int:
        """Items added in the window ending at ``now`` (repeats included)."""
        self._slide(self.window.bucket_of(now))
        return sum(self._counts.values())
