"""The Responses API through the request stages (no network): identity, policy, rewrite."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from guard_server.errors import GuardError
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.rewrite import rewrite_for_upstream
from guard_server.testing import TRUSTED_KEY
from tests.pipeline.helpers import context, planned

TOOLS = [{"type": "function", "name": "add", "parameters": {"type": "object"}}]


async def _responses(body: dict[str, Any], key: str | None = None):  # type: ignore[no-untyped-def]
    kwargs = {"key": key} if key else {}
    return await planned(
        context({"model": "teacher", **body}, endpoint=Endpoint.RESPONSES, **kwargs)
    )


async def _chat(body: dict[str, Any]):  # type: ignore[no-untyped-def]
    return await planned(context({"model": "teacher", **body}))


async def test_a_conversation_has_one_identity_through_either_endpoint() -> None:
    responses = await _responses(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "2+3?"}]},
                {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "5"},
            ],
            "max_output_tokens": 20,
            "tools": TOOLS,
        }
    )
    chat = await _chat(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "2+3?"}]},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "add", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "content": "5", "tool_call_id": "c1"},
            ],
            "max_tokens": 20,
            "tools": TOOLS,
        }
    )
    assert responses.canonical.identities == chat.canonical.identities
    assert responses.canonical.digest == chat.canonical.digest
    other = await _responses({"input": "2+4?", "max_output_tokens": 20})
    assert other.canonical.identities != responses.canonical.identities


async def test_bytes_the_model_ignores_change_nothing() -> None:
    plain = await _responses({"input": [{"role": "user", "content": "hi"}]})
    echoed = await _responses(
        {"input": [{"type": "message", "role": "user", "content": "hi", "id": "msg_1"}]}
    )
    as_string = await _responses({"input": "hi"})
    assert plain.canonical.identities == echoed.canonical.identities
    assert plain.canonical.identities == as_string.canonical.identities


async def test_the_output_limit_is_bounded_and_filled_in_by_its_own_name() -> None:
    filled = await _responses({"input": "hi"})
    assert filled.body["max_output_tokens"] == 8192
    assert ("defaulted", "max_output_tokens") in filled.policy_actions
    clamped = await _responses({"input": "hi", "max_output_tokens": 10**6})
    assert clamped.body["max_output_tokens"] == 8192
    assert ("clamped", "max_output_tokens") in clamped.policy_actions


async def test_logprobs_are_capped_and_dropped_like_chat() -> None:
    include = ["message.output_text.logprobs"]
    capped = await _responses({"input": "hi", "include": include, "top_logprobs": 20})
    assert capped.body["top_logprobs"] == 5
    assert capped.canonical.logprobs == 5
    with pytest.raises(GuardError) as refused:
        await _responses(
            {"input": "hi", "include": include, "text": {"format": {"type": "json_object"}}}
        )
    assert refused.value.param == "text.format"
    trusted = await _responses(
        {"input": "hi", "include": include, "text": {"format": {"type": "json_object"}}},
        key=TRUSTED_KEY,
    )
    assert trusted.body["include"] == include


async def test_the_upstream_request_keeps_no_state_and_carries_the_plugin_arguments() -> None:
    ctx = await _responses({"input": "hi", "seed": 3})
    sent = orjson.loads(rewrite_for_upstream(ctx, "served", guard_plugin=True))
    assert sent["store"] is False
    assert sent["model"] == "served"
    assert sent["seed"] != 3  # re-keyed, as on chat
    assert "stream_options" not in sent


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "item_reference", "id": "msg_1"}, "input[0]"),
        ({"type": "web_search_call", "id": "ws_1"}, "input[0].type"),
        ({"role": "user", "content": "hi", "extra": 1}, "input[0]"),
        ({"role": "robot", "content": "hi"}, "input[0].role"),
        ({"role": {}, "content": "hi"}, "input[0].role"),
        (
            {"role": "user", "content": [{"type": "input_file", "file_id": "f"}]},
            "input[0].content[0].type",
        ),
        (
            {"role": "assistant", "content": [{"type": "output_text", "text": "a"}] * 2},
            "input[0].content",
        ),
        (
            {"type": "reasoning", "encrypted_content": "x", "summary": []},
            "input[0].encrypted_content",
        ),
        ({"type": "function_call", "call_id": "c", "name": "f"}, "input[0].arguments"),
    ],
)
async def test_input_items_the_model_would_not_see_as_sent_are_refused(
    item: dict[str, Any], param: str
) -> None:
    with pytest.raises(GuardError) as refused:
        await _responses({"input": [item]})
    assert refused.value.status == 400 and refused.value.param == param


async def test_content_parts_follow_the_tier() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,AA=="}
    with pytest.raises(GuardError) as refused:
        await _responses({"input": [{"role": "user", "content": [image]}]})
    assert refused.value.code == "parameter_not_allowed" and refused.value.param == "input"
