"""The Redis state store: one Lua script per admission and per settlement, keys hash-tagged
per scope so Redis Cluster keeps each scope's keys on one slot."""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from guard_server.detection.features import RequestFeatures
from guard_server.detection.profile import (
    GAP_ALPHA,
    HALF_LIFE_S,
    IDLE_TTL_S,
    SHARE_ALPHA,
    CampaignProfile,
    ClientProfile,
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
    """Limits shared by every guard replica that points at the same Redis."""

    def __init__(
        self,
        url: str,
        prefix: str = "guard",
        timeout_s: float = 0.25,
        password: str | None = None,
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
        self._admit = self._redis.register_script(_script("admit.lua"))
        self._settle = self._redis.register_script(_script("settle.lua"))
        self._observe_client = self._redis.register_script(_script("observe_client.lua"))
        self._observe_campaign = self._redis.register_script(_script("observe_campaign.lua"))

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

    def _risk_keys(self, client: str) -> list[str]:
        tag = f"{self._prefix}:{{c:{client}}}"
        return [f"{tag}:risk", f"{tag}:prompts"]

    def _campaign_keys(self, fingerprint: str) -> list[str]:
        tag = f"{self._prefix}:{{f:{fingerprint}}}"
        return [f"{tag}:campaign", f"{tag}:members", f"{tag}:prompts"]

    async def observe(
        self, client: str, features: RequestFeatures
    ) -> tuple[ClientProfile, CampaignProfile]:
        ttl_ms = int(IDLE_TTL_S * 1000)
        client_call = (
            self._observe_client.sha, 2, *self._risk_keys(client),
            features.fingerprint, int(features.wants_logprobs), int(features.max_top),
            int(features.logit_bias), SHARE_ALPHA, GAP_ALPHA, HALF_LIFE_S, ttl_ms,
            *features.prompt_hashes,
        )  # fmt: skip
        campaign_call = (
            self._observe_campaign.sha, 3, *self._campaign_keys(features.fingerprint),
            client, int(features.max_top), SHARE_ALPHA, ttl_ms, *features.prompt_hashes,
        )  # fmt: skip
        try:
            mine, shared = await self._evalsha_pipeline(client_call, campaign_call)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        requests, total, distinct, lp, mt, lb, gm, gs = mine
        profile = ClientProfile(
            requests=float(requests),
            total=int(total),
            distinct_prompts=int(distinct),
            logprob_share=float(lp),
            max_top_share=float(mt),
            logit_bias_share=float(lb),
            gap_mean_s=float(gm),
            gap_var_s2=float(gs) - float(gm) ** 2,
            fingerprint=features.fingerprint,
        )
        members, campaign_distinct, campaign_mt = shared
        return profile, CampaignProfile(int(members), int(campaign_distinct), float(campaign_mt))

    async def _evalsha_pipeline(self, *calls: tuple) -> list:
        """Run scripts by SHA in one round trip (their keys may live on different cluster
        slots). redis-py's ``Script`` objects in a pipeline would first ask ``SCRIPT
        EXISTS``, a second round trip on every request; here a script is loaded only when
        Redis answers NOSCRIPT (first use, or after a restart or a flush)."""
        try:
            return await self._pipeline(calls)
        except NoScriptError:
            for script in (self._observe_client, self._observe_campaign):
                await self._redis.script_load(script.script)
            return await self._pipeline(calls)

    async def _pipeline(self, calls: tuple[tuple, ...]) -> list:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(*call)
            return await pipe.execute()

    async def peek(self, client: str) -> tuple[ClientProfile | None, CampaignProfile | None]:
        risk_key, prompts_key = self._risk_keys(client)
        try:
            saved = {
                k.decode(): v.decode() for k, v in (await self._redis.hgetall(risk_key)).items()
            }
            if not saved:
                return None, None
            distinct = await self._redis.pfcount(prompts_key)
            campaign_key, members_key, campaign_prompts = self._campaign_keys(saved["fp"])
            members = await self._redis.pfcount(members_key)
            campaign_distinct = await self._redis.pfcount(campaign_prompts)
            campaign_mt = await self._redis.hget(campaign_key, "mt")
        except (RedisError, OSError) as exc:
            raise StateUnavailable(str(exc)) from exc
        gap_mean = float(saved.get("gm", 0))
        profile = ClientProfile(
            requests=float(saved["n"]),
            total=int(saved["total"]),
            distinct_prompts=int(distinct),
            logprob_share=float(saved["lp"]),
            max_top_share=float(saved["mt"]),
            logit_bias_share=float(saved["lb"]),
            gap_mean_s=gap_mean,
            gap_var_s2=float(saved.get("gs", 0)) - gap_mean**2,
            fingerprint=saved["fp"],
        )
        campaign = CampaignProfile(int(members), int(campaign_distinct), float(campaign_mt or 0))
        return profile, campaign

    async def forget(self, client: str) -> None:
        try:
            await self._redis.delete(*self._risk_keys(client))
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
