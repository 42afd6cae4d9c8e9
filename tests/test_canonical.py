"""The canonical model input: one identity per thing the model sees, whatever the bytes.

Property-based (hypothesis) over message shapes: two requests with the same canonical input
get the same noise keys, plugin seed, detector identities and hardened logprob values; two
with different inputs get different keys.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from guard_server.canonical import (
    OUTPUT_FIELDS,
    PART_KEYS,
    PROMPT_FIELDS,
    SAMPLING_FIELDS,
    TEMPLATE_FIELDS,
    canonical_input,
)
from guard_server.config.loader import load_settings
from guard_server.detection.features import ScaffoldLines, extract_features
from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import CONTENT_PART_TYPES, FIELDS, Endpoint
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.logprob_channel import LogprobChannel
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.rewrite import rewrite_for_upstream
from guard_server.pipeline.sampling import SamplingPlan, plugin_args
from guard_server.pipeline.validate import validate_request
from guard_server.testing import DEMO_KEY, POLICIES

SETTINGS = load_settings(POLICIES / "guard.yaml")
ROLES = ("system", "user", "assistant", "developer", "narrator")
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_request_field_has_exactly_one_role_in_the_identity() -> None:
    # fields that never reach vLLM are stripped or refused before the canonical input is taken
    passable = frozenset(name for name, spec in FIELDS.items() if spec.unpassable is None)
    groups = (PROMPT_FIELDS, TEMPLATE_FIELDS, SAMPLING_FIELDS, OUTPUT_FIELDS)
    assert sum(len(group) for group in groups) == len(passable)
    assert frozenset().union(*groups) == passable


def test_part_keys_cover_the_part_types_vllm_parses() -> None:
    chat_utils = pytest.importorskip("vllm.renderers.chat_utils")
    assert frozenset(PART_KEYS) == CONTENT_PART_TYPES
    vllm_types = set(chat_utils.MM_PARSER_MAP) - {"image_pil"}  # a Python object: not JSON
    assert vllm_types == CONTENT_PART_TYPES
    known = chat_utils._KNOWN_CONTENT_PART_FIELDS
    assert frozenset().union(*PART_KEYS.values()) <= known | {"detail", "file_id"}
    message_keys = chat_utils.CustomChatCompletionMessageParam.__optional_keys__ | {"role"}
    assert {"role", "content", "name", "task", "tool_calls", "reasoning"} <= message_keys
    assert {"tool_call_id", "tools"} <= message_keys


# --------------------------------------------------------------------------- strategies

texts = st.text(max_size=24)
conversations = st.lists(
    st.tuples(st.sampled_from(ROLES), st.lists(texts, min_size=1, max_size=3)),
    min_size=1,
    max_size=4,
)
"""A conversation as the model sees it: each turn's role and its text parts."""


@st.composite
def renderings(draw: st.DrawFn, conversation: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """One chat body for ``conversation``, in any of the spellings vLLM renders alike."""
    messages = []
    for role, parts in conversation:
        spelling = draw(st.sampled_from(["string", "parts", "plain", "mixed"]))
        if spelling == "string":
            content: Any = "\n".join(parts)
        elif spelling == "parts":
            content = [{"type": "text", "text": part} for part in parts]
        elif spelling == "plain":
            content = list(parts)
        else:
            content = [{"text": p, "type": "text"} if i % 2 else p for i, p in enumerate(parts)]
        message: dict[str, Any] = {"role": role, "content": content}
        if draw(st.booleans()):
            message = {"content": content, "role": role}  # key order
        if role == "assistant" and draw(st.booleans()):
            message["tool_calls"] = None  # a null vLLM skips
        messages.append(message)
    body: dict[str, Any] = {"model": "teacher", "messages": messages}
    extras = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "stream": st.booleans(),
                "user": texts,
                "add_generation_prompt": st.just(True),  # vLLM's default, spelled out
                "continue_final_message": st.just(False),
            },
        )
    )
    return {**body, **extras, "logprobs": True, "top_logprobs": 5}


def _ctx(body: dict[str, Any]) -> RequestContext:
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {DEMO_KEY}"}))
    ctx = RequestContext(Endpoint.CHAT, SETTINGS, headers, time.perf_counter())
    ctx.body = copy.deepcopy(body)
    return ctx


def _through_the_pipeline(body: dict[str, Any]) -> RequestContext:
    """Authenticate, validate, policy, canonicalize, plan and rewrite, as the guard does."""

    async def run() -> RequestContext:
        ctx = _ctx(body)
        await authenticate(ctx)
        await validate_request(ctx)
        await apply_tier_policy(ctx)
        await canonicalize(ctx)
        await Planner(GuardMetrics(CollectorRegistry()))(ctx)
        rewrite_for_upstream(ctx, "teacher", guard_plugin=False)
        return ctx

    return asyncio.run(run())


_ANSWER = [
    {
        "index": 0,
        "logprobs": {
            "content": [
                {
                    "token": token,
                    "logprob": value,
                    "top_logprobs": [
                        {"token": token, "logprob": value},
                        {"token": "x", "logprob": value - 1.3},
                        {"token": "y", "logprob": value - 2.1},
                    ],
                }
                for token, value in (("a", -0.7), ("b", -1.1), ("c", -0.4))
            ]
        },
    }
]


def _hardened(ctx: RequestContext) -> list[Any]:
    choices = copy.deepcopy(_ANSWER)
    LogprobChannel().response(ctx, {"choices": choices}, streaming=False)
    return choices


def _plugin_seed(ctx: RequestContext) -> int:
    assert ctx.plan is not None
    noisy = dataclasses.replace(ctx.plan.sampling, noise_sigma=1.0)
    assert isinstance(noisy, SamplingPlan)
    ctx.plan = dataclasses.replace(ctx.plan, sampling=noisy)
    return plugin_args(ctx)["guard_noise_seed"]


def _keys(ctx: RequestContext) -> tuple[Any, ...]:
    assert ctx.canonical is not None
    features = extract_features(ctx.canonical, 5)
    return (
        ctx.canonical.identities,
        features.prompt_hashes,
        features.fingerprint,
        _hardened(ctx),
        _plugin_seed(ctx),
    )


# --------------------------------------------------------------------------- properties


@EXAMPLES
@given(st.data(), conversations)
def test_spellings_of_one_input_get_identical_keys_and_values(
    data: st.DataObject, conversation: list[tuple[str, list[str]]]
) -> None:
    first = data.draw(renderings(conversation))
    second = data.draw(renderings(conversation))
    a, b = _through_the_pipeline(first), _through_the_pipeline(second)
    assert _keys(a) == _keys(b)
    assert a.logprob_keys == b.logprob_keys
    assert a.canonical is not None and b.canonical is not None
    assert a.canonical.digest == b.canonical.digest


@EXAMPLES
@given(st.data(), conversations, conversations)
def test_different_inputs_get_different_keys(
    data: st.DataObject,
    one: list[tuple[str, list[str]]],
    other: list[tuple[str, list[str]]],
) -> None:
    seen = [[(role, "\n".join(parts)) for role, parts in c] for c in (one, other)]
    assume(seen[0] != seen[1])
    a = _through_the_pipeline(data.draw(renderings(one)))
    b = _through_the_pipeline(data.draw(renderings(other)))
    assert a.canonical is not None and b.canonical is not None
    assert a.canonical.identities != b.canonical.identities
    assert a.canonical.digest != b.canonical.digest
    _hardened(a)
    _hardened(b)
    assert a.logprob_keys[0] != b.logprob_keys[0]
    assert _plugin_seed(a) != _plugin_seed(b)


@EXAMPLES
@given(
    conversations,
    st.sampled_from(["temperature", "top_p", "seed", "n", "stop", "presence_penalty"]),
)
def test_sampling_fields_change_the_seed_digest_but_not_the_noise(
    conversation: list[tuple[str, list[str]]], field: str
) -> None:
    body = {
        "model": "teacher",
        "messages": [{"role": r, "content": "\n".join(p)} for r, p in conversation],
    }
    value = {"temperature": 0.3, "top_p": 0.5, "seed": 3, "n": 2, "stop": ["."]}.get(field, 0.5)
    plain, changed = (
        canonical_input(Endpoint.CHAT, body),
        canonical_input(Endpoint.CHAT, {**body, field: value}),
    )
    assert plain.identities == changed.identities
    assert plain.digest != changed.digest


@EXAMPLES
@given(conversations, st.text(min_size=1, max_size=12))
def test_a_message_key_the_model_never_sees_is_refused_by_name(
    conversation: list[tuple[str, list[str]]], key: str
) -> None:
    assume(key not in {"role", "content", "name", "task", "tool_calls", "reasoning"})
    assume(key not in {"reasoning_content", "tool_call_id", "tools"})
    body = {
        "model": "teacher",
        "messages": [{"role": r, "content": "\n".join(p)} for r, p in conversation],
    }
    body["messages"][-1][key] = "17"
    with pytest.raises(GuardError) as caught:
        _through_the_pipeline(body)
    assert caught.value.status == 400
    assert f"`{key}`" in caught.value.message
    assert caught.value.param == f"messages[{len(conversation) - 1}]"


def test_a_key_of_another_role_is_refused() -> None:
    for message in (
        {"role": "user", "content": "hi", "tool_call_id": "1"},
        {"role": "user", "content": "hi", "reasoning": "r"},
        {"role": "system", "content": "hi", "tools": []},
        {"role": "user", "content": [{"type": "text", "text": "hi", "nonce": 1}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f"}, "n": 2}],
        },
    ):
        with pytest.raises(GuardError) as caught:
            _through_the_pipeline({"model": "teacher", "messages": [message]})
        assert caught.value.status == 400, message


def test_template_only_inputs_share_the_noise_but_not_the_seed() -> None:
    """A message's ``name`` reaches vLLM, but a template may drop it (the teacher's does):
    it must not draw fresh noise for the same prompt, yet it does re-key a client's seed."""
    base = {"model": "teacher", "messages": [{"role": "user", "content": "q"}]}
    named = {"model": "teacher", "messages": [{"role": "user", "content": "q", "name": "n7"}]}
    a, b = canonical_input(Endpoint.CHAT, base), canonical_input(Endpoint.CHAT, named)
    assert a.identities == b.identities and a.digest != b.digest


def test_each_prompt_of_a_batch_has_its_own_identity_whatever_its_company() -> None:
    alone = canonical_input(Endpoint.COMPLETIONS, {"model": "teacher", "prompt": "P"})
    batched = canonical_input(Endpoint.COMPLETIONS, {"model": "teacher", "prompt": ["X", "P"]})
    tokens = canonical_input(Endpoint.COMPLETIONS, {"model": "teacher", "prompt": [[1, 2], [3]]})
    assert batched.prompts == 2 and batched.identities[1] == alone.identities[0]
    assert tokens.prompts == 2 and tokens.prompt_texts == ("[1,2]", "[3]")


def test_scaffold_lines_are_bounded_and_keyed_by_hash() -> None:
    lines = ScaffoldLines(max_entries=64)
    big = "x" * 200_000
    for i in range(1_000):
        lines.digest("system", f"{i} {big}")
    assert len(lines) == 64
    stored = lines._lines
    assert all(isinstance(key, int) and len(value) == 16 for key, value in stored.items())
    assert lines.digest("system", "a 1") == lines.digest("system", "a 22")
