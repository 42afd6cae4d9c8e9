"""The Redis state store: one Lua script per admission and per settlement, keys hash-tagged
per scope so Redis Cluster keeps each scope's keys on one slot."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

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
from guard_server.state.base import Admission, LimitSpec, StateStore, StateUnavailable


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


def _shown_rates(spec: LimitSpec, shown: LimitSpec | None) -> tuple[int, int]:
    """The shown buckets' rates for the scripts: 0 when not tightened (see admit.lua)."""
    if shown is None or shown == spec:
        return 0, 0
    return shown.requests_per_minute or 0, shown.tokens_per_minute or 0


class RedisStore(StateStore):
    """Limits shared by every guard replica that points at the same Redis.

    Token buckets run on Redis's clock. Risk profiles run on ``clock`` (the replicas' wall
    clocks, NTP-synchronized): it names the time buckets of the volume windows, whose keys
    the scripts must be given, and a test can drive it.
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
        self._admit = self._redis.register_script(_script("admit.lua"))
        self._settle = self._redis.register_script(_script("settle.lua"))
        self._observe_client = self._redis.register_script(_script("observe_client.lua"))
        self._observe_campaign = self._redis.register_script(_script("observe_campaign.lua"))
        self._observe_end_users = self._redis.register_script(_script("observe_end_users.lua"))

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
        shown_rpm, shown_tpm = _shown_rates(spec, shown)
        args = [
            spec.requests_per_minute or 0,
            spec.tokens_per_minute or 0,
            spec.concurrent_requests or 0,
            tokens,
            slot,
            int(slot_ttl_s * 1000),
            requests,
            shown_rpm,
            shown_tpm,
        ]
        try:
            verdict, left_requests, left, in_flight, retry_ms, shown_r, shown_t = await self._admit(
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
            remaining_requests=float(left_requests) if spec.requests_per_minute else None,
            remaining_tokens=float(left) if spec.tokens_per_minute else None,
            shown_requests=float(shown_r) if spec.requests_per_minute else None,
            shown_tokens=float(shown_t) if spec.tokens_per_minute else None,
            in_flight=int(in_flight),
            slot=slot if allowed and spec.concurrent_requests else "",
            reserved_tokens=tokens if allowed else 0,
        )

    async def settle(
        self,
        scope: str,
        spec: LimitSpec,
        slot: str,
        refund_tokens: int,
        shown: LimitSpec | None = None,
    ) -> None:
        try:
            await self._settle(
                keys=self._keys(scope),
                args=[
                    spec.tokens_per_minute or 0,
                    refund_tokens,
                    slot,
                    _shown_rates(spec, shown)[1],
                ],
            )
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    def _buckets(self, tag: str, kind: str, window: Window, now: float) -> list[str]:
        return [f"{tag}:{kind}:{window.name}:{b}" for b in window.bucket_range(now)]

    def _risk_keys(self, client: str, now: float) -> list[str]:
        tag = f"{self._prefix}:{{c:{client}}}"
        return [
            f"{tag}:risk",
            *self._buckets(tag, "p", DAY, now),
            *self._buckets(tag, "p", WEEK, now),
        ]

    def _end_user_keys(self, client: str, now: float) -> list[str]:
        return self._buckets(f"{self._prefix}:{{c:{client}}}", "e", DAY, now)

    def _campaign_keys(self, fingerprint: str, now: float) -> list[str]:
        tag = f"{self._prefix}:{{f:{fingerprint}}}"
        return [
            f"{tag}:campaign",
            *self._buckets(tag, "m", DAY, now),
            *self._buckets(tag, "p", DAY, now),
        ]

    async def observe(
        self, client: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile]:
        mine, shared = await self._fold(client, features, want=True)
        return _client_profile(mine, features.fingerprint), _campaign_profile(shared)

    async def count(self, client: str, features: RequestFeatures) -> None:
        await self._fold(client, features, want=False)

    async def observe_end_user(
        self, client: str, end_user_scope: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile, ClientProfile]:
        mine, shared, end_users, own = await self._fold(
            client, features, want=True, end_user_scope=end_user_scope
        )
        profile = _client_profile(mine, features.fingerprint)
        profile.end_users = int(end_users)
        return profile, _campaign_profile(shared), _client_profile(own, features.fingerprint)

    async def _fold(
        self, client: str, features: RequestFeatures, want: bool, end_user_scope: str = ""
    ) -> list:
        now = self._clock()
        ttl_ms = int(IDLE_TTL_S * 1000)
        day_ttl_ms, week_ttl_ms = (int(w.expires_in_s(now) * 1000) + 1 for w in (DAY, WEEK))
        campaign_keys = self._campaign_keys(features.fingerprint, now)
        calls = [self._client_call(client, features, want, now, day_ttl_ms, week_ttl_ms)]
        calls.append((
            self._observe_campaign.sha, len(campaign_keys), *campaign_keys,
            client, int(features.max_top), SHARE_ALPHA, ttl_ms, day_ttl_ms, int(want),
            *features.prompt_hashes,
        ))  # fmt: skip
        if end_user_scope:  # the end user among the client's, and the end user's own profile
            end_user_keys = self._end_user_keys(client, now)
            calls.append((
                self._observe_end_users.sha, len(end_user_keys), *end_user_keys,
                end_user_scope, day_ttl_ms,
            ))  # fmt: skip
            calls.append(
                self._client_call(end_user_scope, features, want, now, day_ttl_ms, week_ttl_ms)
            )
        try:
            return await self._evalsha_pipeline(*calls)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc

    def _client_call(
        self,
        scope: str,
        features: RequestFeatures,
        want: bool,
        now: float,
        day_ttl_ms: int,
        week_ttl_ms: int,
    ) -> tuple:
        """observe_client.lua's call for one scope (a client, or an end user of one)."""
        risk_keys = self._risk_keys(scope, now)
        return (
            self._observe_client.sha, len(risk_keys), *risk_keys,
            features.fingerprint, int(features.wants_logprobs), int(features.max_top),
            int(features.logit_bias), SHARE_ALPHA, GAP_ALPHA, HALF_LIFE_S, int(IDLE_TTL_S * 1000),
            repr(now), DAY.bucket_of(now), DAY.buckets, day_ttl_ms, week_ttl_ms, int(want),
            *features.prompt_hashes,
        )  # fmt: skip

    async def _evalsha_pipeline(self, *calls: tuple) -> list:
        """Run scripts by SHA in one round trip (their keys may live on different cluster
        slots). redis-py's ``Script`` objects in a pipeline would first ask ``SCRIPT
        EXISTS``, a second round trip on every request; here a script is loaded only when
        Redis answers NOSCRIPT (first use, or after a restart or a flush)."""
        try:
            return await self._pipeline(calls)
        except NoScriptError:
            for script in (self._observe_client, self._observe_campaign, self._observe_end_users):
                await self._redis.script_load(script.script)
            return await self._pipeline(calls)

    async def _pipeline(self, calls: tuple[tuple, ...]) -> list:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(*call)
            return await pipe.execute()

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
