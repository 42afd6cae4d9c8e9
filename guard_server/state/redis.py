"""The Redis state store: one Lua script per request on its way in (observation and
admission) and one per settlement; keys hash-tagged per client and per fingerprint."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from guard_server.detection.features import RequestFeatures
from guard_server.detection.profile import (
    DAY,
    GAP_ALPHA,
    HALF_LIFE_S,
    IDLE_TTL_S,
    SHARE_ALPHA,
    WEEK,
    CampaignProfile,
    ClientProfile,
    Window,
)
from guard_server.state.base import (
    Admission,
    AdmitRequest,
    LimitSpec,
    SpeculativeStore,
    StateUnavailable,
)


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


class _Batcher:
    """The commands the event loop's requests issue, written to Redis in batches on one
    pooled connection at a time, replies read in order: while one batch is out, the next
    one gathers. One connection checkout, one write and one task per batch instead of per
    command (redis-py's per-command path was most of the Redis mode's CPU). Commands are
    packed by hiredis."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pool = redis.connection_pool
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._sender: asyncio.Task[None] | None = None

    def __call__(self, *args: Any) -> asyncio.Future:
        """Send ``args`` with the next batch; the future holds its reply (or error)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((args, future))
        if self._sender is None:
            # Started after this tick's callbacks, so that the tick's commands go together.
            self._sender = loop.create_task(self._send_all())
        return future

    async def _send_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send(batch)
        finally:
            self._sender = None
            if self._pending:  # cancelled with commands waiting: they still go
                self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def _send(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        done = 0
        try:
            connection = await self._pool.get_connection()
            try:
                await connection.send_packed_command(
                    b"".join(hiredis.pack_command(args) for args, _ in batch)
                )
                for _, future in batch:
                    try:
                        reply = await connection.read_response()
                    except ResponseError as exc:  # this command's error; the rest still come
                        reply = exc
                    done += 1
                    if future.done():  # its request was cancelled
                        continue
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
            finally:
                await self._pool.release(connection)
        except BaseException as exc:  # the connection failed: so did every unanswered command
            for _, future in batch[done:]:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RedisError(exc))
            if not isinstance(exc, Exception):
                raise


class _Script:
    """A Lua script run by its SHA (``EVALSHA`` through the batcher), loaded when Redis
    answers NOSCRIPT (first use, or after a restart or a flush). Built from function files
    and a main chunk."""

    def __init__(self, redis: aioredis.Redis, batch: _Batcher, *files: str, main: str) -> None:
        self.text = "\n".join([*(_source(name) for name in files), main])
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()
        self._redis = redis
        self._batch = batch

    async def __call__(self, keys: list[str], args: list | tuple) -> Any:
        try:
            return await self._batch("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(self.text)
            return await self._batch("EVALSHA", self.sha, len(keys), *keys, *args)


def _shown_rates(spec: LimitSpec, shown: LimitSpec | None) -> tuple[int, int]:
    """The shown buckets' rates for the scripts: 0 when not tightened (see admit.lua)."""
    if shown is None or shown == spec:
        return 0, 0
    return shown.requests_per_minute or 0, shown.tokens_per_minute or 0


def _admit_args(request: AdmitRequest, speculative: bool) -> list[str]:
    spec = request.spec
    shown_rpm, shown_tpm = _shown_rates(spec, request.shown)
    return [
        str(spec.requests_per_minute or 0),
        str(spec.tokens_per_minute or 0),
        str(spec.concurrent_requests or 0),
        str(request.tokens),
        request.slot,
        str(int(request.slot_ttl_s * 1000)),
        str(request.requests),
        str(shown_rpm),
        str(shown_tpm),
        _FLAG[speculative],
    ]


def _admission(request: AdmitRequest, reply: list) -> Admission | None:
    """admit.lua's reply as an Admission; None for a deferred speculative one."""
    verdict = reply[0]
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    if verdict == "defer":
        return None
    _, left_requests, left, in_flight, retry_ms, shown_r, shown_t = reply
    spec = request.spec
    allowed = verdict == "ok"
    return Admission(
        allowed=allowed,
        exceeded=None if allowed else verdict,
        retry_after_s=int(retry_ms) / 1000,
        remaining_requests=float(left_requests) if spec.requests_per_minute else None,
        remaining_tokens=float(left) if spec.tokens_per_minute else None,
        shown_requests=float(shown_r) if spec.requests_per_minute else None,
        shown_tokens=float(shown_t) if spec.tokens_per_minute else None,
        in_flight=int(in_flight),
        slot=request.slot if allowed and spec.concurrent_requests else "",
        reserved_tokens=request.tokens if allowed else 0,
    )


_FLAG = ("0", "1")
"""A flag as a script argument: arguments go as strings, which hiredis packs 2-4x faster
than ints and floats."""
_IDLE_TTL_MS = str(int(IDLE_TTL_S * 1000))
_SHARE_ALPHA, _GAP_ALPHA, _HALF_LIFE_S = (
    repr(float(x)) for x in (SHARE_ALPHA, GAP_ALPHA, HALF_LIFE_S)
)
_OBSERVE_COUNTS = ("14", "6")  # arguments of observe_client and observe_campaign
_DAY_BUCKETS = str(DAY.buckets)

_KEY_CACHE = 65_536
"""Clients (and fingerprints) whose current bucket keys are kept formatted."""


class RedisStore(SpeculativeStore):
    """Limits shared by every guard replica that points at the same Redis.

    Token buckets run on Redis's clock. Risk profiles run on ``clock`` (the replicas' wall
    clocks, NTP-synchronized): it names the time buckets of the volume windows, whose keys
    the scripts must be given, and a test can drive it.

    A request costs one round trip on its way in: ``observe_admit`` (one script) folds it
    into both profiles and takes its admission; ``settle`` is a second, off the answer's path.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "guard",
        timeout_s: float = 0.25,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        self._prefix = prefix
        self._clock = clock
        redis, batch = self._redis, _Batcher(self._redis)
        self._admit = _Script(redis, batch, "admit.lua", main="return admit(KEYS, ARGV)")
        self._readmit = _Script(redis, batch, "admit.lua", "readmit.lua", main="")
        self._settle = _Script(redis, batch, "settle.lua", main="")
        self._observe_admit = _Script(
            redis, batch, "observe_client.lua", "observe_campaign.lua", "admit.lua",
            "observe_admit.lua", main="",
        )  # fmt: skip
        # an end user's own profile (no campaign), and the key's count of its end users
        self._observe_client = _Script(
            redis, batch, "observe_client.lua",
            main=f"return observe_client(KEYS, {{unpack(ARGV, 1, {_OBSERVE_COUNTS[0]})}}, "
            f"{{unpack(ARGV, {int(_OBSERVE_COUNTS[0]) + 1})}})",
        )  # fmt: skip
        self._observe_end_users = _Script(redis, batch, "observe_end_users.lua", main="")
        # (tag, kind, DAY bucket) -> (every bucket key of the windows, the current ones)
        self._key_cache: dict[tuple[str, str, int], tuple[list[str], list[str]]] = {}

    def _keys(self, scope: str) -> list[str]:
        tag = f"{self._prefix}:{{{scope}}}"
        return [f"{tag}:bucket", f"{tag}:slots"]

    async def admit(
        self,
        scope: str,
        spec: LimitSpec,
        tokens: int,
        slot: str,
        slot_ttl_s: float,
        *,
        requests: int = 1,
        shown: LimitSpec | None = None,
    ) -> Admission:
        request = AdmitRequest(scope, spec, tokens, slot, slot_ttl_s, requests, shown)
        try:
            reply = await self._admit(self._keys(scope), _admit_args(request, speculative=False))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        admission = _admission(request, reply)
        assert admission is not None  # only a speculative admission defers
        return admission

    async def readmit(self, taken: AdmitRequest, request: AdmitRequest | None) -> Admission | None:
        spec = taken.spec
        args = [
            spec.requests_per_minute or 0, spec.tokens_per_minute or 0, taken.requests,
            taken.tokens, taken.slot if spec.concurrent_requests else "",
        ]  # fmt: skip
        if request is not None:
            args += _admit_args(request, speculative=False)
        try:
            reply = await self._readmit(self._keys(taken.scope), args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return _admission(request, reply) if request is not None else None

    async def settle(
        self,
        scope: str,
        spec: LimitSpec,
        slot: str,
        refund_tokens: int,
        shown: LimitSpec | None = None,
    ) -> None:
        args = [
            str(spec.tokens_per_minute or 0),
            str(refund_tokens),
            slot,
            str(_shown_rates(spec, shown)[1]),
        ]
        try:
            await self._settle(self._keys(scope), args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    def _window_keys(
        self, tag: str, kind: str, windows: tuple[Window, ...], now: float
    ) -> tuple[list[str], list[str]]:
        """The bucket keys of ``windows`` at ``now`` for one profile: every bucket (oldest
        first, window by window) and the current ones."""
        cache_key = (tag, kind, DAY.bucket_of(now))  # a WEEK bucket starts with a DAY one
        keys = self._key_cache.get(cache_key)
        if keys is None:
            if len(self._key_cache) >= _KEY_CACHE:
                self._key_cache.clear()
            every = [
                f"{tag}:{k}:{window.name}:{b}"
                for k, window in zip(kind, windows, strict=True)
                for b in window.bucket_range(now)
            ]
            current = [
                f"{tag}:{k}:{window.name}:{window.bucket_of(now)}"
                for k, window in zip(kind, windows, strict=True)
            ]
            keys = self._key_cache[cache_key] = (every, current)
        return keys

    def _risk_keys(self, client: str, now: float, every: bool = True) -> list[str]:
        tag = f"{self._prefix}:{{c:{client}}}"
        buckets = self._window_keys(tag, "pp", (DAY, WEEK), now)
        return [f"{tag}:risk", *buckets[0 if every else 1]]

    def _end_user_keys(self, client: str, now: float) -> list[str]:
        tag = f"{self._prefix}:{{c:{client}}}"
        return self._window_keys(tag, "e", (DAY,), now)[0]

    def _campaign_keys(self, fingerprint: str, now: float, every: bool = True) -> list[str]:
        tag = f"{self._prefix}:{{f:{fingerprint}}}"
        buckets = self._window_keys(tag, "mp", (DAY, DAY), now)
        return [f"{tag}:campaign", *buckets[0 if every else 1]]

    async def observe(
        self, client: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile]:
        profile, campaign, _ = await self.observe_admit(client, features, None, want=True)
        assert profile is not None and campaign is not None
        return profile, campaign

    async def count(self, client: str, features: RequestFeatures) -> None:
        await self.observe_admit(client, features, None, want=False)

    async def observe_end_user(
        self, client: str, end_user_scope: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile, ClientProfile]:
        now = self._clock()
        day_ttl_ms, week_ttl_ms = (str(int(w.expires_in_s(now) * 1000) + 1) for w in (DAY, WEEK))
        own_args = _client_args(features, now, day_ttl_ms, week_ttl_ms, want=True)
        try:  # three scripts, one batch: one round trip
            (profile, campaign, _), end_users, own = await asyncio.gather(
                self.observe_admit(client, features, None, want=True),
                self._observe_end_users(
                    self._end_user_keys(client, now), [end_user_scope, day_ttl_ms]
                ),
                self._observe_client(
                    self._risk_keys(end_user_scope, now), [*own_args, *features.prompt_hashes]
                ),
            )
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        assert profile is not None and campaign is not None
        profile.end_users = int(end_users)
        return profile, campaign, _client_profile(own, features.fingerprint)

    async def observe_scope(self, scope: str, features: RequestFeatures) -> ClientProfile:
        now = self._clock()
        day_ttl_ms, week_ttl_ms = (str(int(w.expires_in_s(now) * 1000) + 1) for w in (DAY, WEEK))
        args = _client_args(features, now, day_ttl_ms, week_ttl_ms, want=True)
        try:
            values = await self._observe_client(
                self._risk_keys(scope, now), [*args, *features.prompt_hashes]
            )
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        return _client_profile(values, features.fingerprint)

    async def observe_admit(
        self,
        client: str,
        features: RequestFeatures,
        request: AdmitRequest | None,
        *,
        want: bool,
    ) -> tuple[ClientProfile | None, CampaignProfile | None, Admission | None]:
        now = self._clock()
        day_ttl_ms, week_ttl_ms = (str(int(w.expires_in_s(now) * 1000) + 1) for w in (DAY, WEEK))
        fingerprint = features.fingerprint
        client_keys = self._risk_keys(client, now, every=want)
        campaign_keys = self._campaign_keys(fingerprint, now, every=want)
        admit_args = _admit_args(request, speculative=True) if request is not None else ()
        keys = [*client_keys, *campaign_keys]
        if request is not None:
            keys += self._keys(request.scope)
        max_top, counts = _FLAG[features.max_top], _FLAG[want]
        args = (
            str(len(client_keys)), str(len(campaign_keys)), *_OBSERVE_COUNTS,
            str(len(admit_args)),
            *_client_args(features, now, day_ttl_ms, week_ttl_ms, want),
            client, max_top, _SHARE_ALPHA, _IDLE_TTL_MS, day_ttl_ms, counts,
            *admit_args, *features.prompt_hashes,
        )  # fmt: skip
        try:
            mine, shared, verdict = await self._observe_admit(keys, args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        admission = _admission(request, verdict) if request is not None else None
        if not want:
            return None, None, admission
        return _client_profile(mine, fingerprint), _campaign_profile(shared), admission

    async def peek(self, client: str) -> tuple[ClientProfile | None, CampaignProfile | None]:
        now = self._clock()
        risk_key, *buckets = self._risk_keys(client, now)
        day_keys, week_keys = buckets[: DAY.buckets], buckets[DAY.buckets :]
        fields = [f"q{b}" for b in DAY.bucket_range(now)]
        try:
            saved = {
                k.decode(): v.decode() for k, v in (await self._redis.hgetall(risk_key)).items()
            }
            if not saved:
                return None, None
            day = await self._redis.pfcount(*day_keys)
            week = await self._redis.pfcount(*week_keys)
            campaign_key, *campaign_buckets = self._campaign_keys(saved["fp"], now)
            members = await self._redis.pfcount(*campaign_buckets[: DAY.buckets])
            campaign_distinct = await self._redis.pfcount(*campaign_buckets[DAY.buckets :])
            campaign_mt = await self._redis.hget(campaign_key, "mt")
            end_users = await self._redis.pfcount(*self._end_user_keys(client, now))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        mine = [
            saved["n"], saved["total"], day, week, sum(int(saved.get(f, 0)) for f in fields),
            saved["lp"], saved["mt"], saved["lb"], saved.get("gm", 0), saved.get("gs", 0),
            saved.get("tp", 0), now - float(saved.get("since", now)),
        ]  # fmt: skip
        campaign = _campaign_profile([members, campaign_distinct, campaign_mt or 0])
        profile = _client_profile(mine, saved["fp"])
        profile.end_users = int(end_users)
        return profile, campaign

    async def forget(self, client: str) -> None:
        try:
            now = self._clock()
            await self._redis.delete(
                *self._risk_keys(client, now), *self._end_user_keys(client, now)
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


def _client_args(
    features: RequestFeatures, now: float, day_ttl_ms: str, week_ttl_ms: str, want: bool
) -> tuple[str, ...]:
    """observe_client.lua's arguments for one request (of a client, or an end user of one)."""
    return (
        features.fingerprint, _FLAG[features.wants_logprobs], _FLAG[features.max_top],
        _FLAG[features.logit_bias], _SHARE_ALPHA, _GAP_ALPHA, _HALF_LIFE_S, _IDLE_TTL_MS,
        repr(now), str(DAY.bucket_of(now)), _DAY_BUCKETS, day_ttl_ms, week_ttl_ms, _FLAG[want],
    )  # fmt: skip


def _client_profile(values: list, fingerprint: str) -> ClientProfile:
    """A profile from observe_client.lua's reply (or the same values read by ``peek``)."""
    requests, total, day, week, window_requests, lp, mt, lb, gm, gs, tp, age = values
    gap_mean = float(gm)
    return ClientProfile(
        requests=float(requests),
        total=int(total),
        distinct_prompts=int(day),
        distinct_week=int(week),
        window_requests=int(window_requests),
        logprob_share=float(lp),
        max_top_share=float(mt),
        logit_bias_share=float(lb),
        gap_mean_s=gap_mean,
        gap_var_s2=float(gs) - gap_mean**2,
        fingerprint=fingerprint,
        templated_share=float(tp),
        age_s=float(age),
    )


def _campaign_profile(values: list) -> CampaignProfile:
    members, distinct, max_top = values
    return CampaignProfile(int(members), int(distinct), float(max_top))
