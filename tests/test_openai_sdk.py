"""The guard is a drop-in OpenAI endpoint: the official SDK against real vLLM, through it."""

from __future__ import annotations

import openai
import pytest

from guard_server.teacher.task import check, completion_prompt, make_problems
from guard_server.testing import GuardProcess, metric_value

PROBLEM = make_problems(1, seed=11, split="heldout")[0]


def test_chat_completion_answers_like_vllm(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="teacher",
        messages=[{"role": "user", "content": PROBLEM.question}],
        temperature=0,
    )
    assert reply.object == "chat.completion"
    assert reply.model == "teacher"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_filled_in_max_tokens_is_named_and_fits_the_model(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="teacher", messages=[{"role": "user", "content": PROBLEM.question}], temperature=0
    )
    # the default tier fills in its 8192, lowered to the teacher's 256-token context
    assert raw.headers["x-guard-policy"] == "tier=default; defaulted=max_tokens"
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "stop" and check(
        PROBLEM, reply.choices[0].message.content or ""
    )
    explicit = client.chat.completions.with_raw_response.create(
        model="teacher", messages=[{"role": "user", "content": PROBLEM.question}], max_tokens=40
    )
    assert "x-guard-policy" not in explicit.headers


def test_completion_with_stop_and_n(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="teacher",
        prompt=completion_prompt(PROBLEM.question),
        max_tokens=20,
        n=3,
        temperature=1.0,
        stop=["."],
    )
    assert len(reply.choices) == 3
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        assert "." not in choice.text
        assert choice.finish_reason in ("stop", "length")


def test_chat_stream_with_logprobs_ends_cleanly(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="teacher",
        messages=[{"role": "user", "content": PROBLEM.question}],
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    text, logprob_tokens, finish = "", 0, None
    for chunk in stream:
        assert chunk.model == "teacher"
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs and choice.logprobs.content:
                for item in choice.logprobs.content:
                    assert len(item.top_logprobs) <= 3
                    logprob_tokens += 1
            finish = choice.finish_reason or finish
    assert text
    assert logprob_tokens > 0
    assert finish in ("stop", "length")


def test_stream_usage_only_when_asked(client: openai.OpenAI) -> None:
    def usage_chunks(**options: object) -> int:
        stream = client.completions.create(
            model="teacher", prompt=completion_prompt(PROBLEM.question), max_tokens=8,
            stream=True, **options,
        )  # fmt: skip
        return sum(1 for chunk in stream if chunk.usage is not None)

    assert usage_chunks() == 0
    assert usage_chunks(stream_options={"include_usage": True}) == 1


def test_greedy_teacher_answer_is_correct_through_the_guard(client: openai.OpenAI) -> None:
    problems = make_problems(20, seed=3, split="heldout")
    correct = 0
    for problem in problems:
        reply = client.chat.completions.create(
            model="teacher",
            messages=[{"role": "user", "content": problem.question}],
            temperature=0,
        )
        correct += check(problem, reply.choices[0].message.content or "")
    assert correct >= 19


async def test_async_sdk_concurrent_streams(async_client: openai.AsyncOpenAI) -> None:
    import asyncio

    async def one(i: int) -> str:
        stream = await async_client.completions.create(
            model="teacher", prompt=completion_prompt(PROBLEM.question), max_tokens=12,
            temperature=0, stream=True,
        )  # fmt: skip
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    texts = await asyncio.gather(*(one(i) for i in range(16)))
    assert len(set(texts)) == 1 and texts[0]


def test_models_lists_what_the_tier_may_use(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["teacher"]


def test_metrics_count_requests_tokens_and_ttft(client: openai.OpenAI, guard: GuardProcess) -> None:
    before = guard.metrics()
    stream = client.chat.completions.create(
        model="teacher", messages=[{"role": "user", "content": PROBLEM.question}], stream=True
    )
    for _ in stream:
        pass
    after = guard.metrics()
    labels = {"tier": "default", "endpoint": "chat"}
    assert metric_value(after, "guard_requests_total", status="200", **labels) == (
        metric_value(before, "guard_requests_total", status="200", **labels) + 1
    )
    assert metric_value(after, "guard_completion_tokens_total", tier="default") > metric_value(
        before, "guard_completion_tokens_total", tier="default"
    )
    assert metric_value(after, "guard_time_to_first_token_seconds_count", **labels) == (
        metric_value(before, "guard_time_to_first_token_seconds_count", **labels) + 1
    )
    assert metric_value(after, "guard_overhead_seconds_count", endpoint="chat") > 0
    assert "sk-guard" not in after


def test_models_retrieve_returns_the_listed_entry(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    assert client.models.retrieve("teacher") == listed["teacher"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    error = caught.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"


def test_models_retrieve_needs_a_key(guard: GuardProcess) -> None:
    anonymous = openai.OpenAI(base_url=guard.base_url, api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.retrieve("teacher")


def test_platform_fields_are_accepted_and_stripped_by_name(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="teacher",
        messages=[{"role": "user", "content": PROBLEM.question}],
        max_tokens=8,
        user="u1",
        safety_identifier="u1-hash",
        service_tier="auto",
        metadata={"run": "sdk-test"},
        store=False,
        prompt_cache_key="k1",
        verbosity="low",
    )
    assert raw.parse().choices[0].message.content
    stripped = raw.headers["x-guard-policy"].split("; ")
    for name in ("safety_identifier", "service_tier", "metadata", "store", "prompt_cache_key"):
        assert f"stripped={name}" in stripped
    assert "stripped=verbosity" in stripped and "stripped=user" not in stripped
    completion = client.completions.with_raw_response.create(
        model="teacher", prompt="2 + 2 =", max_tokens=2, extra_body={"service_tier": "auto"}
    )
    assert "stripped=service_tier" in completion.headers["x-guard-policy"]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("functions", [{"name": "f", "parameters": {"type": "object"}}], "`tools`"),
        ("function_call", "auto", "`tool_choice`"),
        ("web_search_options", {}, "web"),
        ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ],
)
def test_unserved_chat_fields_are_refused_with_the_reason(
    client: openai.OpenAI, field: str, value: object, reason: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": "hi"}], **{field: value}
        )
    error = caught.value.response.json()["error"]
    assert error["param"] == field and error["code"] == "parameter_not_allowed"
    assert reason in error["message"]


def test_suffix_is_refused_on_completions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="teacher", prompt="def f(", suffix="return 1")
    error = caught.value.response.json()["error"]
    assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]


def test_best_of_is_refused_on_completions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="teacher", prompt="1 + 1 =", best_of=2, max_tokens=4)
    error = caught.value.response.json()["error"]
    assert error["param"] == "best_of" and "`n`" in error["message"]
