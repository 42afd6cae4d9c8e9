"""Each pipeline stage alone, on a hand-made RequestContext (no network)."""

from __future__ import annotations

import time

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from guard_server.config.loader import load_settings
from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.rewrite import rewrite_for_upstream
from guard_server.pipeline.score import FRESH_REQUESTS, REASSESS_EVERY, RiskScorer
from guard_server.pipeline.transform import transform_chunk
from guard_server.pipeline.validate import validate_request
from guard_server.state.memory import MemoryStore
from guard_server.testing import DEMO_KEY, POLICIES, TRUSTED_KEY

SETTINGS = load_settings(POLICIES / "guard.yaml")


def _ctx(
    body: dict, key: str | None = DEMO_KEY, endpoint: Endpoint = Endpoint.CHAT
) -> RequestContext:
    headers = CIMultiDict({"Authorization": f"Bearer {key}"} if key else {})
    ctx = RequestContext(endpoint, SETTINGS, CIMultiDictProxy(headers), time.perf_counter())
    ctx.body = body
    return ctx


async def _run(ctx: RequestContext) -> RequestContext:
    await authenticate(ctx)
    await validate_request(ctx)
    await apply_tier_policy(ctx)
    await canonicalize(ctx)
    await Planner(GuardMetrics(CollectorRegistry()))(ctx)
    return ctx


def _chat(**fields: object) -> dict:
    return {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], **fields}


async def test_authenticate_maps_keys_to_tiers() -> None:
    ctx = _ctx({}, key=TRUSTED_KEY)
    await authenticate(ctx)
    assert ctx.client is not None and ctx.client.tier.name == "trusted"
    with pytest.raises(GuardError) as caught:
        await authenticate(_ctx({}, key="sk-guard-dem0"))
    assert caught.value.status == 401


async def test_chat_without_max_tokens_gets_the_tier_maximum_named_as_a_default() -> None:
    ctx = await _run(_ctx(_chat()))
    assert ctx.body["max_tokens"] == 8192
    assert ctx.policy_actions == [("defaulted", "max_tokens")]
    # completions keep vLLM's (and OpenAI's) own default of 16
    completion = await _run(
        _ctx({"model": "teacher", "prompt": "hi"}, endpoint=Endpoint.COMPLETIONS)
    )
    assert "max_tokens" not in completion.body and completion.policy_actions == []


async def test_filled_in_and_clamped_max_tokens_never_exceed_the_model_context() -> None:
    # vLLM refuses a max_tokens above its max_model_len, so neither the default nor a clamp
    # may produce one; a client's own value within the tier's bound is passed as it is.
    for body, expected, note in (
        (_chat(), 256, ("defaulted", "max_tokens")),
        (_chat(max_tokens=100_000), 256, ("clamped", "max_tokens")),
        (_chat(max_completion_tokens=9000), 256, ("clamped", "max_completion_tokens")),
        (_chat(max_tokens=300), 300, None),
    ):
        ctx = _ctx(body)
        ctx.max_model_len = 256
        await _run(ctx)
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        assert ctx.body[field] == expected
        assert ctx.policy_actions == ([note] if note else [])


async def test_clamp_rewrites_and_notes_the_field() -> None:
    ctx = await _run(_ctx(_chat(logprobs=True, top_logprobs=-1)))
    assert ctx.body["top_logprobs"] == 5
    assert ("clamped", "top_logprobs") in ctx.policy_actions
    rewrite_for_upstream(ctx, "m", guard_plugin=False)
    assert ctx.policy_actions.count(("clamped", "top_logprobs")) == 1
    assert ("hardened", "logprobs") in ctx.policy_actions


async def test_temperature_below_minimum_is_rejected() -> None:
    with pytest.raises(GuardError) as caught:
        await _run(_ctx(_chat(temperature=-0.5)))
    assert caught.value.status == 400 and caught.value.param == "temperature"


async def test_chat_only_field_is_unknown_on_completions() -> None:
    body = {"model": "teacher", "prompt": "x", "top_logprobs": 2}
    with pytest.raises(GuardError) as caught:
        await _run(_ctx(body, endpoint=Endpoint.COMPLETIONS))
    assert caught.value.param == "top_logprobs"


@pytest.mark.parametrize("prompt", [[], [1, "a"], [[1], []], {"text": "x"}])
async def test_malformed_prompts_are_rejected(prompt: object) -> None:
    with pytest.raises(GuardError) as caught:
        await _run(_ctx({"model": "teacher", "prompt": prompt}, endpoint=Endpoint.COMPLETIONS))
    assert caught.value.param == "prompt"


async def test_booleans_are_not_integers() -> None:
    with pytest.raises(GuardError) as caught:
        await _run(_ctx(_chat(n=True)))
    assert caught.value.param == "n"


async def test_rewrite_forces_usage_and_transform_hides_it_again() -> None:
    ctx = await _run(_ctx(_chat(stream=True)))
    sent = orjson.loads(rewrite_for_upstream(ctx, "served-name", guard_plugin=False))
    assert sent["model"] == "served-name"
    assert sent["stream_options"] == {"include_usage": True}
    usage_chunk = {
        "model": "served-name",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    assert transform_chunk(ctx, usage_chunk) is False
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (3, 4)
    text_chunk = {"model": "served-name", "choices": [{"index": 0, "delta": {"content": "a"}}]}
    assert transform_chunk(ctx, text_chunk) is True
    assert text_chunk["model"] == "teacher"


async def test_plugin_args_follow_the_tier_and_the_action() -> None:
    import dataclasses

    from guard_server.config.schema import SamplingPolicy
    from guard_server.detection.scoring import Assessment
    from guard_server.pipeline.plan import make_plan
    from guard_server.pipeline.sampling import plugin_args

    ctx = await _run(_ctx(_chat(temperature=1.0)))
    assert plugin_args(ctx) == {}
    sampling = SamplingPolicy.model_validate(
        {"noise": {"sigma": 0.5}, "bounds": {"top_k": 20}, "watermark": {"enabled": True}}
    )
    assert ctx.client is not None
    tier = dataclasses.replace(ctx.client.tier, sampling=sampling)
    ctx.client = dataclasses.replace(ctx.client, tier=tier)
    ctx.plan = make_plan(SETTINGS.secret, ctx.client, None)
    args = plugin_args(ctx)
    assert args["guard_noise_sigma"] == 0.5 and args["guard_top_k"] == 20
    assert args["guard_wm_gamma"] == 0.25 and 0 <= args["guard_wm_key"] < 2**31
    assert plugin_args(ctx) == args  # the same request gets the same keys
    ctx.plan = make_plan(SETTINGS.secret, ctx.client, Assessment(0.42, {}, "perturb"))
    assert plugin_args(ctx)["guard_noise_sigma"] == 1.0
    sent = orjson.loads(rewrite_for_upstream(ctx, "m", guard_plugin=True))
    assert sent["vllm_xargs"]["guard_noise_seed"] == args["guard_noise_seed"]


class _CountingStore(MemoryStore):
    """The memory store, counting which of its two fold methods the scorer used."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"observe": 0, "count": 0}

    async def observe(self, client, features):  # type: ignore[no-untyped-def]
        self.calls["observe"] += 1
        return await super().observe(client, features)

    async def count(self, client, features):  # type: ignore[no-untyped-def]
        self.calls["count"] += 1
        await super().count(client, features)


async def test_scorer_assesses_young_clients_always_then_one_request_in_four() -> None:
    store = _CountingStore()
    scorer = RiskScorer(store, GuardMetrics(CollectorRegistry()))
    scores = []
    for i in range(FRESH_REQUESTS + 4 * REASSESS_EVERY):
        ctx = await _run(_ctx(_chat(messages=[{"role": "user", "content": f"q {i}"}])))
        await scorer(ctx)
        assert ctx.assessment is not None and ctx.fingerprint
        scores.append(ctx.assessment.score)
    # Every request is counted into the profile; only the young ones and every 4th after
    # that are assessed, and the reused assessment is the last one computed.
    assert store.calls == {"observe": FRESH_REQUESTS + 4, "count": 4 * (REASSESS_EVERY - 1)}
    assert ctx.client is not None
    profile, _ = await store.peek(ctx.client.id)
    assert profile is not None and profile.total == FRESH_REQUESTS + 4 * REASSESS_EVERY
    tail = scores[FRESH_REQUESTS:]
    assert all(tail[i] == tail[i - i % REASSESS_EVERY] for i in range(len(tail)))
    assert scores[-1] > scores[0]  # distinct prompts keep raising it
