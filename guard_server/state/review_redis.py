"""Review state shared through Redis: every replica and worker sees a pin or a reset at once.

Pins live in a hash, the board in a sorted set (``<prefix>:{review}:pins|board|seen``, one
Redis Cluster slot). An admin change is written there and published on
``<prefix>:review``; every replica follows that channel and applies the change to its
in-process copy as it arrives, so the request path reads pins from memory and never waits
on Redis for them. Every ``tick_s`` each replica also, in one script call: adds the board
values of the clients it assessed since the last tick, drops clients idle for longer than a
risk profile lives and expired pins, and reads back the top of the board and every pin (so a
message lost while the channel was down is made good within one tick).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from guard_server.detection.profile import IDLE_TTL_S
from guard_server.state.base import StateUnavailable
from guard_server.state.redis import RedisStore
from guard_server.state.review import Pin, ReviewState, board_range, board_value

log = logging.getLogger(__name__)

TICK_S = 2.0
"""How often a replica pushes its board values and re-reads the board's top and the pins."""
_RECONNECT_S = (0.5, 10.0)  # first and longest wait before following the channel again


class RedisReview(ReviewState):
    """Pins, resets and the board in Redis, followed by every replica."""

    def __init__(
        self,
        store: RedisStore,
        url: str,
        prefix: str = "guard",
        timeout_s: float = 0.25,
        top_k: Callable[[], int] = lambda: 20,
        tick_s: float = TICK_S,
        idle_s: float = IDLE_TTL_S,
        password: str | None = None,
    ) -> None:
        super().__init__()
        self._store = store
        self._redis = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            decode_responses=True,
        )
        # The channel is read with no socket timeout (it is quiet most of the time); a
        # periodic PING notices a dead connection.
        self._subscriber = aioredis.Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=timeout_s,
            health_check_interval=10,
            decode_responses=True,
        )
        tag = f"{prefix}:{{review}}"
        self._keys = [f"{tag}:board", f"{tag}:seen", f"{tag}:pins"]
        self._channel = f"{prefix}:review"
        self._tick_script = self._redis.register_script(
            resources.files(__package__).joinpath("review_tick.lua").read_text()
        )
        self._top_k = top_k
        self._tick_s = tick_s
        self._idle_s = idle_s
        self._dirty: dict[str, float] = {}  # board values noted since the last tick
        self._top: list[tuple[str, float]] = []
        # When a message last changed a client's pin or reset it (monotonic): a tick that
        # started earlier may carry older data for that client, and must not overwrite it.
        self._pinned_at: dict[str, float] = {}
        self._reset_at: dict[str, float] = {}
        self._tick_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._following = asyncio.Event()  # subscribed, and caught up since
        self._failing = False
        self._id = uuid.uuid4().hex  # tells this replica's own messages apart

    def note(self, client: str, score: float, assessed: str) -> None:
        self._dirty[client] = board_value(score, assessed)

    def top(self, k: int) -> list[tuple[str, float]]:
        return self._top[:k]

    async def page(
        self, offset: int, limit: int, assessed: str | None = None
    ) -> tuple[list[tuple[str, float]], int]:
        await self.tick()  # this replica's latest notes first
        low, high = board_range(assessed)
        board = self._keys[0]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zcount(board, low, f"({high}")
                pipe.zrevrangebyscore(
                    board, f"({high}", low, start=offset, num=limit, withscores=True
                )
                total, pairs = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return [(client, float(value)) for client, value in pairs], int(total)

    async def values(self, clients: list[str]) -> dict[str, float]:
        if not clients:
            return {}
        await self.tick()
        try:
            found = await self._redis.zmscore(self._keys[0], clients)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return {c: float(v) for c, v in zip(clients, found, strict=True) if v is not None}

    async def set_pin(self, client: str, pin: Pin | None) -> None:
        pinned = pin.to_json() if pin else None
        message = {"op": "pin", "client": client, "pin": pinned, "from": self._id}
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if pin is None:
                    pipe.hdel(self._keys[2], client)
                else:
                    pipe.hset(self._keys[2], client, json.dumps(pin.to_json()))
                pipe.publish(self._channel, json.dumps(message))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        self._receive(message)

    async def reset(self, client: str) -> None:
        await self._store.forget(client)
        message = {"op": "reset", "client": client, "from": self._id}
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._keys[0], client)
                pipe.zrem(self._keys[1], client)
                pipe.publish(self._channel, json.dumps(message))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        self._receive(message)

    def _receive(self, message: dict) -> None:
        """Apply one change, published by this replica or another."""
        client = message["client"]
        if message["op"] == "pin":
            pin = message["pin"]
            self._apply_pin(client, Pin.from_json(pin) if pin else None)
            self._pinned_at[client] = time.monotonic()
        elif message["op"] == "reset":
            self._dirty.pop(client, None)
            self._top = [entry for entry in self._top if entry[0] != client]
            self._reset_at[client] = time.monotonic()
            self._apply_reset(client)

    async def tick(self) -> None:
        """Push the board values noted here; read back the board's top and the pins."""
        async with self._tick_lock:
            started = time.monotonic()
            dirty, self._dirty = self._dirty, {}
            now = time.time()
            args: list[object] = [now, now - self._idle_s, max(0, self._top_k())]
            for client, value in dirty.items():
                args += (client, value)
            try:
                top, pins = await self._tick_script(keys=self._keys, args=args)
            except (RedisError, OSError) as exc:
                for client, value in dirty.items():  # keep them for the next tick
                    self._dirty.setdefault(client, value)
                raise StateUnavailable(str(exc)) from exc
            self._apply_tick(started, top, pins)

    def _apply_tick(self, started: float, top: list[str], pins: list[str]) -> None:
        fresh = {pins[i]: Pin.from_json(json.loads(pins[i + 1])) for i in range(0, len(pins), 2)}
        for client in set(self._pins) | set(fresh):
            if self._pinned_at.get(client, -1.0) < started:
                self._apply_pin(client, fresh.get(client))
        self._top = [
            (top[i], float(top[i + 1]))
            for i in range(0, len(top), 2)
            if self._reset_at.get(top[i], -1.0) < started
        ]
        self._pinned_at = {c: t for c, t in self._pinned_at.items() if t >= started}
        self._reset_at = {c: t for c, t in self._reset_at.items() if t >= started}

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow(), name="review-follow"),
            asyncio.create_task(self._tick_forever(), name="review-tick"),
        ]
        with contextlib.suppress(TimeoutError):  # Redis down: the tasks keep trying
            await asyncio.wait_for(self._following.wait(), 2.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()
        await self._subscriber.aclose()

    async def _follow(self) -> None:
        """Apply every change another replica publishes, as it arrives. Once subscribed
        (again, after a failure), catch up with one tick: what was published before is in
        Redis, and what is published after arrives on the channel."""
        wait = _RECONNECT_S[0]
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                await self.tick()
                self._following.set()
                wait = _RECONNECT_S[0]
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message["type"] == "message":
                        self._on_published(message["data"])
            except (RedisError, OSError, StateUnavailable) as exc:
                self._following.clear()
                log.warning("review channel lost (retrying in %.1f s): %s", wait, exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RECONNECT_S[1])
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _on_published(self, data: str) -> None:
        try:
            message = json.loads(data)
            if message.get("from") != self._id:  # this replica applied its own already
                self._receive(message)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignored a malformed message on %s: %s", self._channel, exc)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                await self.tick()
            except StateUnavailable as exc:
                if not self._failing:
                    log.warning("review state: Redis unavailable (pins kept as last read): %s", exc)
                self._failing = True
            else:
                self._failing = False
