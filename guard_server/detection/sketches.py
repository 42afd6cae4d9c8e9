"""A fixed-size distinct counter (k minimum values) for the in-process store."""

from __future__ import annotations

import bisect

_SPACE = float(1 << 64)


class DistinctCounter:
    """Estimates how many distinct 64-bit hex hashes were added, in O(k) memory."""

    __slots__ = ("_k", "_smallest")

    def __init__(self, k: int = 256) -> None:
        self._k = k
        self._smallest: list[int] = []

    def add(self, hex_hash: str) -> None:
        """Add one hashed item."""
        value = int(hex_hash, 16)
        smallest = self._smallest
        if len(smallest) >= self._k and value >= smallest[-1]:
            return
        index = bisect.bisect_left(smallest, value)
        if index < len(smallest) and smallest[index] == value:
            return
        smallest.insert(index, value)
        if len(smallest) > self._k:
            smallest.pop()

    def count(self) -> int:
        """The estimated number of distinct items (exact below k)."""
        if len(self._smallest) < self._k:
            return len(self._smallest)
        return round((self._k - 1) * _SPACE / (self._smallest[-1] + 1))
