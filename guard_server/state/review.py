"""Review state: operators' pins, profile resets, and the board of clients' last risk scores.

Reading is on the request path and never waits on I/O: every replica keeps the pins and the
board in process. Writing (an admin call) updates the shared copy and tells every replica at
once (:mod:`guard_server.state.review_redis`); with the memory backend there is one process
and its copy is the only one.
"""

from __future__ import annotations

import abc
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from guard_server.detection.scoring import ACTIONS
from guard_server.state.memory import MemoryStore

PIN_ACTIONS = ("allow", "deny")
_RANK = {action: rank for rank, action in enumerate(ACTIONS)}
_RANK_STEP = 10.0  # a board value is rank * 10 + score (scores are 0..1)


@dataclass(frozen=True, slots=True)
class Pin:
    """An operator's decision for one client, in force until ``until`` (Unix time)."""

    action: str  # allow: served as pass whatever the score; deny: refused with 403
    until: float
    by: str = ""  # who set it, as the admin caller named themselves
    note: str = ""
    at: float = 0.0  # when it was set
    until_iso: str = field(default="", compare=False)  # `until` in ISO 8601 (filled in)

    def __post_init__(self) -> None:
        # Formatted once: a pinned client's every request names it in the plan's reason.
        object.__setattr__(self, "until_iso", iso_time(self.until))

    def active(self, now: float) -> bool:
        """Whether the pin is still in force at ``now``."""
        return now < self.until

    def to_json(self) -> dict[str, Any]:
        """The pin as stored and as the admin API shows it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pin:
        """A pin from :meth:`to_json`'s output."""
        return cls(
            action=str(data["action"]),
            until=float(data["until"]),
            by=str(data.get("by", "")),
            note=str(data.get("note", "")),
            at=float(data.get("at", 0.0)),
        )


def iso_time(unix: float) -> str:
    """A Unix time as ``2025-01-31T12:00:00Z``."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def board_value(score: float, assessed: str) -> float:
    """How a client ranks on the board: by the action its score calls for, then by score.

    Tiers have different thresholds, so a raw score does not order clients by what is done
    to them; this value puts every decoyed client before any tightened one.
    """
    return _RANK[assessed] * _RANK_STEP + score


def board_score(value: float) -> float:
    """The risk score inside a board value."""
    return round(value % _RANK_STEP, 4)


def board_action(value: float) -> str:
    """The action the client's score called for when it was noted on the board."""
    return ACTIONS[int(value // _RANK_STEP)]


def board_range(assessed: str | None) -> tuple[float, float]:
    """The board values [low, high) of clients whose score calls for ``assessed`` (any:
    ``None``)."""
    if assessed is None:
        return -1.0, len(ACTIONS) * _RANK_STEP
    low = _RANK[assessed] * _RANK_STEP
    return low, low + _RANK_STEP


class ReviewState(abc.ABC):
    """Pins, resets and the score board, as every replica sees them.

    ``pin_of`` and ``note`` run on every request and only touch this process's memory; the
    ``async`` methods are for the admin API.
    """

    def __init__(self) -> None:
        self._pins: dict[str, Pin] = {}
        self._reset_listeners: list[Callable[[str], None]] = []

    def pin_of(self, client: str, now: float | None = None) -> Pin | None:
        """The client's pin in force, if any (an expired pin counts as none)."""
        if not self._pins:
            return None
        pin = self._pins.get(client)
        if pin is None or pin.active(time.time() if now is None else now):
            return pin
        return None

    def pins(self) -> dict[str, Pin]:
        """Every pin still in force."""
        now = time.time()
        return {client: pin for client, pin in self._pins.items() if pin.active(now)}

    def on_reset(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(client)`` whenever a client's profile is reset, on any replica,
        so that what this process caches about the client goes too."""
        self._reset_listeners.append(listener)

    def _apply_pin(self, client: str, pin: Pin | None) -> None:
        if pin is None:
            self._pins.pop(client, None)
        else:
            self._pins[client] = pin

    def _apply_reset(self, client: str) -> None:
        for listener in self._reset_listeners:
            listener(client)

    @abc.abstractmethod
    def note(self, client: str, score: float, assessed: str) -> None:
        """Record the client's latest assessment on the board (request path: no I/O)."""

    @abc.abstractmethod
    def top(self, k: int) -> list[tuple[str, float]]:
        """At most ``k`` (client, board value) pairs, highest first (for the metrics)."""

    @abc.abstractmethod
    async def page(
        self, offset: int, limit: int, assessed: str | None = None
    ) -> tuple[list[tuple[str, float]], int]:
        """One page of the board, highest value first (ties by client id, descending), and
        how many clients match: all of them, or those whose score calls for ``assessed``."""

    @abc.abstractmethod
    async def values(self, clients: list[str]) -> dict[str, float]:
        """The board values of those of ``clients`` that are on the board."""

    @abc.abstractmethod
    async def set_pin(self, client: str, pin: Pin | None) -> None:
        """Pin the client (``None``: back to ``auto``) on every replica, at once."""

    @abc.abstractmethod
    async def reset(self, client: str) -> None:
        """Forget the client's risk profile and board entry on every replica, at once.
        Its rate-limit buckets and its pin are kept."""

    async def start(self) -> None:  # noqa: B027 - nothing to start in one process
        """Load the shared state and start following it."""

    async def close(self) -> None:  # noqa: B027 - nothing to close in one process
        """Stop following the shared state."""


class MemoryReview(ReviewState):
    """Review state of one process (the memory backend: one replica, one worker).

    The board keeps the ``max_clients`` clients noted most recently: the metrics' top and
    the admin list read it whole, so their cost grows with it (the Redis board is indexed).
    """

    def __init__(self, store: MemoryStore, max_clients: int = 100_000) -> None:
        super().__init__()
        self._store = store
        self._board: OrderedDict[str, float] = OrderedDict()  # least recently noted first
        self._max_clients = max_clients

    def note(self, client: str, score: float, assessed: str) -> None:
        board = self._board
        board[client] = board_value(score, assessed)
        board.move_to_end(client)
        if len(board) > self._max_clients:
            board.popitem(last=False)

    def top(self, k: int) -> list[tuple[str, float]]:
        return heapq.nlargest(k, self._board.items(), key=itemgetter(1))

    async def page(
        self, offset: int, limit: int, assessed: str | None = None
    ) -> tuple[list[tuple[str, float]], int]:
        low, high = board_range(assessed)
        matching = [(c, v) for c, v in self._board.items() if low <= v < high]
        matching.sort(key=itemgetter(1, 0), reverse=True)
        return matching[offset : offset + limit], len(matching)

    async def values(self, clients: list[str]) -> dict[str, float]:
        return {c: self._board[c] for c in clients if c in self._board}

    async def set_pin(self, client: str, pin: Pin | None) -> None:
        self._apply_pin(client, pin)

    async def reset(self, client: str) -> None:
        await self._store.forget(client)
        self._board.pop(client, None)
        self._apply_reset(client)
