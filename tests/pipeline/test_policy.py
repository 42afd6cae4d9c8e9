"""The tier policy's request-side rules: content parts, prompts per request, logprobs under
constrained decoding, and safe values for every key a tier leaves out."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from guard_server.config.schema import DEFAULT_BOUNDS, TierPolicy
from guard_server.errors import GuardError
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.admit import estimate_tokens
from guard_server.testing import TRUSTED_KEY
from tests.pipeline.helpers import context, planned, planned_for_client


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], **fields}


def _completion(prompt: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "teacher", "prompt": prompt, **fields}


async def _refused(body: dict[str, Any], endpoint: Endpoint = Endpoint.CHAT) -> GuardError:
    with pytest.raises(GuardError) as caught:
        await planned(context(body, endpoint=endpoint))
    assert caught.value.status == 400
    return caught.value


def test_a_tier_that_says_nothing_gets_the_safe_values() -> None:
    tier = TierPolicy()
    assert tier.logprobs.max_top == 5 and tier.logprobs.noise.scale == 1.0
    assert tier.logprobs.quantize.mode == "grid" and not tier.logprobs.allow_echo
    assert tier.logprobs.with_constraints == "reject"
    assert tier.logprobs.exact_sampled_above is None
    bias = tier.logit_bias
    assert (bias.mode, bias.max_entries, bias.max_abs, bias.with_logprobs) == (
        "limit", 10, 5.0, "reject",
    )  # fmt: skip
    assert tier.seed == "rekey" and tier.max_prompts == 4 and tier.content_parts == ["text"]
    assert tier.bounds == DEFAULT_BOUNDS
    assert tier.detection.enabled and tier.detection.mode == "enforce"


def test_bounds_merge_per_field_and_null_opts_out() -> None:
    tier = TierPolicy.model_validate({"bounds": {"n": {"max": 8}, "temperature": None}})
    assert tier.bounds["n"].max == 8
    assert tier.bounds["max_tokens"] == DEFAULT_BOUNDS["max_tokens"]
    assert "temperature" not in tier.bounds


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}},
        {"type": "prompt_embeds", "data": "AAAA"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_embeds", "image_embeds": "AAAA"},
        {"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/v.mp4"}},
        {"type": "refusal", "refusal": "no"},
    ],
)
async def test_content_parts_outside_the_tier_list_are_refused(part: dict[str, Any]) -> None:
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, part]}])
    error = await _refused(body)
    assert error.param == "messages" and f"`{part['type']}`" in error.message
    trusted = await planned(context(body, key=TRUSTED_KEY))  # the trusted tier lists them all
    assert trusted.canonical is not None


async def test_a_part_without_a_type_or_of_an_unknown_type_is_refused() -> None:
    for part in ({"image_url": {"url": "http://x"}}, {"type": "file", "file": {}}):
        body = _chat(messages=[{"role": "user", "content": [part]}])
        assert (await _refused(body)).param.startswith("messages[0].content[0]")


async def test_prompts_per_request_are_bounded_by_the_tier() -> None:
    ctx = await planned(context(_completion(["a", "b", "c", "d"]), endpoint=Endpoint.COMPLETIONS))
    assert ctx.canonical is not None and ctx.canonical.prompts == 4
    error = await _refused(_completion([[1, 2]] * 5), Endpoint.COMPLETIONS)
    assert error.param == "prompt" and "at most 4" in error.message
    await planned(context(_completion([[1]] * 64), TRUSTED_KEY, Endpoint.COMPLETIONS))


async def test_the_token_estimate_counts_prompts_times_n_times_max_tokens() -> None:
    body = _completion(["x" * 40, "y" * 40, "z"], n=4, max_tokens=10)
    ctx = await planned(context(body, endpoint=Endpoint.COMPLETIONS))
    assert estimate_tokens(ctx) == (11 + 11 + 1) + 3 * 4 * 10
    tokens = _completion([[1, 2, 3], [4]], n=2, max_tokens=5)
    ctx = await planned(context(tokens, endpoint=Endpoint.COMPLETIONS))
    assert estimate_tokens(ctx) == 4 + 2 * 2 * 5
    chat = await planned(context(_chat(n=2, max_tokens=7)))
    assert estimate_tokens(chat) == 1 + 2 * 7


CONSTRAINTS = {
    "structured_outputs": {"structured_outputs": {"regex": "[AZ]"}},
    "response_format": {"response_format": {"type": "json_object"}},
    "tool_choice": {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "required",
    },
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
}


@pytest.mark.parametrize("name", CONSTRAINTS)
async def test_logprobs_under_a_constraint_are_refused_by_default(name: str) -> None:
    error = await _refused(_chat(logprobs=True, top_logprobs=5, **CONSTRAINTS[name]))
    assert error.param == name and "renormalised" in error.message
    await planned(context(_chat(**CONSTRAINTS[name])))  # the constraint alone is fine
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}
    error = await _refused(
        _completion("q", logprobs=2, response_format=schema), Endpoint.COMPLETIONS
    )
    assert error.param == "response_format"


async def test_a_text_response_format_or_tool_choice_none_is_no_constraint() -> None:
    await planned(context(_chat(logprobs=True, response_format={"type": "text"})))
    await planned(context(_chat(logprobs=True, tool_choice="none", **CONSTRAINTS["tools"])))


async def test_strip_drops_the_logprobs_and_allow_returns_no_exact_value() -> None:
    base = context(_chat())
    await planned(base)
    assert base.client is not None
    tier = base.client.tier

    def with_mode(mode: str) -> Any:
        logprobs = tier.logprobs.model_copy(update={"with_constraints": mode})
        return dataclasses.replace(base.client, tier=dataclasses.replace(tier, logprobs=logprobs))

    body = _chat(logprobs=True, top_logprobs=5, **CONSTRAINTS["structured_outputs"])
    stripped = context(body)
    stripped.client = with_mode("strip")
    await planned_for_client(stripped)
    assert "logprobs" not in stripped.body and ("stripped", "logprobs") in stripped.policy_actions
    allowed = context(body)
    allowed.client = with_mode("allow")
    await planned_for_client(allowed)
    assert allowed.body["top_logprobs"] == 5
    assert allowed.plan is not None and allowed.plan.hardening.exact_above is None
    assert base.plan is not None and base.plan.hardening.exact_above == 0.9
