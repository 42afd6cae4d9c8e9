"""The Redis state store: one Lua script per admission and per settlement, keys hash-tagged
per scope so Redis Cluster keeps each scope's keys on one slot."""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from guard_server.state.base import Admission, LimitSpec, StateStore, StateUnavailable


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


class RedisStore(StateStore):
    """Limits shared by every guard replica that points at the same Redis."""

    def __init__(self, url: str, prefix: str = "guard", timeout_s: float = 0.25) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        self._prefix = prefix
        self._admit = self._redis.register_script(_script("admit.lua"))
        self._settle = self._redis.register_script(_script("settle.lua"))

    def _keys(self, scope: str) -> list[str]:
        tag = f"{self._prefix}:{{{scope}}}"
        return [f"{tag}:bucket", f"{tag}:slots"]

    async def admit(
        self, scope: str, spec: LimitSpec, tokens: int, slot: str, slot_ttl_s: float
    ) -> Admission:
        args = [
            spec.requests_per_minute or 0,
            spec.tokens_per_minute or 0,
            spec.concurrent_requests or 0,
            tokens,
            slot,
            int(slot_ttl_s * 1000),
        ]
        try:
            verdict, requests, left, in_flight, retry_ms = await self._admit(
                keys=self._keys(scope), args=args
            )
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        allowed = verdict == "ok"
        return Admission(
            allowed=allowed,
            exceeded=None if allowed else verdict,
            retry_after_s=int(retry_ms) / 1000,
            remaining_requests=float(requests) if spec.requests_per_minute else None,
            remaining_tokens=float(left) if spec.tokens_per_minute else None,
            in_flight=int(in_flight),
            slot=slot if allowed and spec.concurrent_requests else "",
            reserved_tokens=tokens if allowed else 0,
        )

    async def settle(self, scope: str, spec: LimitSpec, slot: str, refund_tokens: int) -> None:
        try:
            await self._settle(
                keys=self._keys(scope),
                args=[spec.tokens_per_minute or 0, refund_tokens, slot],
            )
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    async def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
