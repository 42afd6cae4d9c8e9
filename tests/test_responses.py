"""``/v1/responses`` through the guard: the official SDK against real vLLM, on both tiers."""

from __future__ import annotations

import asyncio
import json
import math

import openai
import pytest

from guard_server.teacher.task import make_problems
from guard_server.testing import GuardProcess, metric_value

PROBLEM = make_problems(1, seed=11, split="heldout")[0]
LOGPROBS = ["message.output_text.logprobs"]
_GRID = 0.5  # the default tier's logprobs.quantize step (policies/default.yaml)


def _logprob_values(response) -> list[float]:  # type: ignore[no-untyped-def]
    values = []
    for item in response.output:
        for part in getattr(item, "content", None) or ():
            for position in part.logprobs or ():
                values.append(position.logprob)
                values.extend(entry.logprob for entry in position.top_logprobs)
    return values


def _on_grid(value: float) -> bool:
    return abs(value / _GRID - round(value / _GRID)) < 1e-9


def _json_prefix(text: str) -> bool:
    """Whether ``text`` can begin a JSON document (completing it parses)."""
    for ending in ("", "}", '"}', '": 1}', "1}"):
        try:
            json.loads(text + ending)
        except ValueError:
            continue
        return True
    return False


def test_create_answers_with_usage_and_names_the_defaulted_limit(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model="teacher", input=PROBLEM.question, temperature=0
    )
    assert raw.headers["x-guard-policy"] == "tier=default; defaulted=max_output_tokens"
    assert raw.headers["x-request-id"]
    response = raw.parse()
    assert response.object == "response" and response.model == "teacher"
    assert response.status == "completed"
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens > 0
    # what the model read is the chat request's: the same answer at temperature 0
    chat = client.chat.completions.create(
        model="teacher", messages=[{"role": "user", "content": PROBLEM.question}], temperature=0
    )
    assert response.output_text == chat.choices[0].message.content


def test_instructions_and_input_items(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="teacher",
        instructions="Answer with the number only.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": PROBLEM.question}]},
        ],
        max_output_tokens=16,
        temperature=0,
    )
    assert response.output_text


def test_logprobs_are_hardened_on_default_and_raw_on_trusted(
    client: openai.OpenAI, trusted_client: openai.OpenAI
) -> None:
    def ask(sdk: openai.OpenAI):  # type: ignore[no-untyped-def]
        return sdk.responses.with_raw_response.create(
            model="teacher",
            input=PROBLEM.question,
            max_output_tokens=12,
            temperature=0,
            include=LOGPROBS,
            top_logprobs=8,
        )

    raw_default, raw_trusted = ask(client), ask(trusted_client)
    policy = raw_default.headers["x-guard-policy"]
    assert "clamped=top_logprobs" in policy and "hardened=logprobs" in policy
    hardened, trusted = raw_default.parse(), raw_trusted.parse()
    assert hardened.output_text == trusted.output_text  # greedy: the same tokens
    default_values, trusted_values = _logprob_values(hardened), _logprob_values(trusted)
    assert default_values and trusted_values
    assert all(len(p.top_logprobs) <= 5 for p in hardened.output[0].content[0].logprobs or ())
    assert any(len(p.top_logprobs) > 5 for p in trusted.output[0].content[0].logprobs or ())
    # default: keyed noise, then a 0.5 grid (a confident sampled token's own value is exact)
    for position in hardened.output[0].content[0].logprobs or ():
        others = [e.logprob for e in position.top_logprobs if e.token != position.token]
        assert all(value <= 0 and _on_grid(value) for value in others)
        assert _on_grid(position.logprob) or position.logprob >= math.log(0.9)
    assert not all(_on_grid(value) for value in trusted_values)
    assert default_values != trusted_values


def test_stream_yields_typed_events_with_hardened_logprobs(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model="teacher",
        input=PROBLEM.question,
        max_output_tokens=12,
        temperature=0,
        include=LOGPROBS,
        top_logprobs=3,
        stream=True,
    )
    kinds, text, delta_values = [], "", []
    final = None
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
            delta_values += [p.logprob for p in event.logprobs]
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert final is not None and final.model == "teacher" and final.output_text == text
    final_values = [p.logprob for p in final.output[0].content[0].logprobs or ()]
    # the deltas' positions run on: each value as the final list's value at that position
    assert delta_values == final_values
    whole = client.responses.create(
        model="teacher",
        input=PROBLEM.question,
        max_output_tokens=12,
        temperature=0,
        include=LOGPROBS,
        top_logprobs=3,
    )
    # a whole answer hardens alike (exact confident values may differ in vLLM's last digits;
    # vLLM lists the end-of-sequence token's logprob in a whole answer only)
    whole_values = [p.logprob for p in whole.output[0].content[0].logprobs or ()]
    common = min(len(whole_values), len(final_values))
    assert common >= len(final_values) - 1
    assert whole_values[:common] == pytest.approx(final_values[:common], abs=1e-4)


def test_json_schema_output_with_logprobs_follows_with_constraints(
    client: openai.OpenAI, trusted_client: openai.OpenAI
) -> None:
    text = {
        "format": {
            "type": "json_schema",
            "name": "answer",
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "integer"}},
                "required": ["answer"],
                "additionalProperties": False,
            },
        }
    }
    response = client.responses.create(
        model="teacher", input=PROBLEM.question, max_output_tokens=30, text=text, temperature=0
    )
    # constrained: the tiny teacher opens the object and then pads it with JSON whitespace
    assert response.output_text.startswith("{")
    assert _json_prefix(response.output_text)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model="teacher", input=PROBLEM.question, text=text, include=LOGPROBS
        )
    assert refused.value.body["param"] == "text.format"  # type: ignore[index]
    assert refused.value.body["code"] == "parameter_not_allowed"  # type: ignore[index]
    allowed = trusted_client.responses.create(
        model="teacher", input=PROBLEM.question, max_output_tokens=30, text=text,
        include=LOGPROBS, temperature=0,
    )  # fmt: skip
    assert allowed.output[0].content[0].logprobs


def test_function_tools_and_a_tool_result_round_trip(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        }
    ]
    response = client.responses.create(
        model="teacher",
        input=[
            {"role": "user", "content": "What is 2 plus 3?"},
            {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a":2,"b":3}'},
            {"type": "function_call_output", "call_id": "c1", "output": "5"},
        ],
        tools=tools,
        max_output_tokens=16,
        temperature=0,
    )
    assert response.status in ("completed", "incomplete")
    assert response.tools[0].name == "add"


@pytest.mark.parametrize(
    ("field", "value"),
    [("previous_response_id", "resp_123"), ("background", True), ("conversation", "conv_1")],
)
def test_stateful_fields_are_refused(client: openai.OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="teacher", input="hi", extra_body={field: value})
    body = refused.value.body
    assert body["param"] == field and body["code"] == "parameter_not_allowed"  # type: ignore[index]
    assert "send the whole conversation in `input`" in body["message"] or field == "background"  # type: ignore[index]


def test_refusals_in_the_guards_words(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="teacher", input=[{"type": "item_reference", "id": "msg_1"}])
    assert refused.value.body["param"] == "input[0]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="teacher", input="hi", extra_body={"prompt": {"id": "p"}})
    assert "prompt template" in refused.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="teacher", input="hi", extra_body={"max_tokens": 5})
    assert refused.value.body["code"] == "unknown_parameter"  # type: ignore[index]


def test_vllm_rejections_come_back_in_the_guards_words(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="teacher", input="7 plus 5 " * 200, max_output_tokens=8)
    body = refused.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "input"  # type: ignore[index]
    assert "vllm" not in body["message"].lower() and "256" not in body["message"]  # type: ignore[index]


def test_metrics_count_responses_requests_tokens_and_ttft(
    client: openai.OpenAI, guard: GuardProcess
) -> None:
    before = guard.metrics()
    for _ in client.responses.create(
        model="teacher", input=PROBLEM.question, max_output_tokens=8, stream=True
    ):
        pass
    after = guard.metrics()
    labels = {"tier": "default", "endpoint": "responses"}
    for name in ("guard_requests_total", "guard_time_to_first_token_seconds_count"):
        extra = {"status": "200"} if name == "guard_requests_total" else {}
        assert metric_value(after, name, **labels, **extra) == (
            metric_value(before, name, **labels, **extra) + 1
        )
    assert metric_value(after, "guard_completion_tokens_total", tier="default") > metric_value(
        before, "guard_completion_tokens_total", tier="default"
    )


def test_the_sdks_stream_helper_and_async_client(
    client: openai.OpenAI, guard: GuardProcess
) -> None:
    with client.responses.stream(
        model="teacher", input=PROBLEM.question, max_output_tokens=12, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.status in ("completed", "incomplete")

    async def ask() -> str:
        async with openai.AsyncOpenAI(
            base_url=guard.base_url, api_key=client.api_key, max_retries=0
        ) as sdk:
            response = await sdk.responses.create(
                model="teacher", input=PROBLEM.question, max_output_tokens=12, temperature=0
            )
            return response.output_text

    assert asyncio.run(ask()) == final.output_text


def test_request_id_round_trip(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="teacher",
        input="hi",
        max_output_tokens=4,
        extra_headers={"x-request-id": "responses-test-1"},
    )
    assert response._request_id == "responses-test-1"
