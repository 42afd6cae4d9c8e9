"""Every bad request gets an OpenAI-shaped error with the status the SDK maps to its class."""

from __future__ import annotations

import httpx
import openai
import pytest

from guard_server.teacher.task import completion_prompt
from guard_server.testing import GuardProcess

CHAT = [{"role": "user", "content": "What is 1 + 2?"}]


def _assert_openai_shape(exc: openai.APIStatusError, param: str | None = None) -> None:
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("key", [None, "Bearer", "sk-wrong-key", "Basic abc"])
def test_bad_keys_are_authentication_errors(guard: GuardProcess, key: str | None) -> None:
    headers = {} if key is None else {"Authorization": key if " " in key else f"Bearer {key}"}
    response = httpx.post(
        guard.base_url + "/chat/completions",
        json={"model": "teacher", "messages": CHAT},
        headers=headers,
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_sdk_raises_authentication_error(guard: GuardProcess) -> None:
    client = openai.OpenAI(base_url=guard.base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="teacher", messages=CHAT)
    _assert_openai_shape(caught.value)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_unknown_field_is_rejected_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="teacher", messages=CHAT, extra_body={"guided_json": {"type": "object"}}
        )
    _assert_openai_shape(caught.value, param="guided_json")
    assert "guided_json" in caught.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "ten"), ("temperature", "hot"), ("n", 1.5), ("stream", "yes"), ("stop", 3)],
)
def test_bad_types_are_rejected(client: openai.OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="teacher", messages=CHAT, extra_body={field: value})
    _assert_openai_shape(caught.value, param=field)


def test_out_of_bounds_value_is_rejected_when_the_tier_says_so(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="teacher", messages=CHAT, n=8)
    _assert_openai_shape(caught.value, param="n")
    assert "tier `default`" in caught.value.message


def test_out_of_bounds_value_is_clamped_with_a_visible_header(client: openai.OpenAI) -> None:
    # above the tier's 8192, and clamped to the teacher's context (256, read from vLLM's
    # /v1/models): vLLM would refuse 8192 on a 256-token model
    raw = client.completions.with_raw_response.create(
        model="teacher", prompt=completion_prompt("What is 1 + 2?"), max_tokens=100_000,
        logprobs=20,
    )  # fmt: skip
    assert "clamped=max_tokens" in raw.headers["x-guard-policy"]
    assert "clamped=logprobs" in raw.headers["x-guard-policy"]
    completion = raw.parse()
    assert completion.usage.completion_tokens <= 256
    top = completion.choices[0].logprobs.top_logprobs
    assert top and all(len(position) <= 6 for position in top)


@pytest.mark.parametrize(
    "field",
    ["prompt_logprobs", "echo", "logprob_token_ids", "allowed_token_ids",
     "return_tokens_as_token_ids", "prompt_embeds", "kv_transfer_params"],
)  # fmt: skip
def test_risky_vllm_fields_are_forbidden_for_the_default_tier(
    client: openai.OpenAI, field: str
) -> None:
    values = {
        "prompt_logprobs": 1, "echo": True, "logprob_token_ids": [5],
        "allowed_token_ids": [5, 6], "return_tokens_as_token_ids": True, "prompt_embeds": "AA==",
        "kv_transfer_params": {},
    }  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="teacher", prompt="x", max_tokens=2, extra_body={field: values[field]}
        )
    _assert_openai_shape(caught.value, param=field)


def test_trusted_tier_may_use_echo(trusted_client: openai.OpenAI) -> None:
    reply = trusted_client.completions.create(
        model="teacher", prompt="What", max_tokens=2, extra_body={"echo": True}
    )
    assert reply.choices[0].text.startswith("What")


def test_client_vllm_xargs_is_stripped(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="teacher", prompt="x", max_tokens=2, extra_body={"vllm_xargs": {"noise": 0}}
    )
    assert "stripped=vllm_xargs" in raw.headers["x-guard-policy"]


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    _assert_openai_shape(caught.value, param="model")


def test_body_over_the_limit_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="teacher", prompt="x" * 1_100_000, max_tokens=1)
    assert caught.value.status_code == 413
    _assert_openai_shape(caught.value)


def test_invalid_json_and_unknown_routes(guard: GuardProcess) -> None:
    headers = {"Authorization": "Bearer sk-guard-demo", "Content-Type": "application/json"}
    response = httpx.post(guard.base_url + "/completions", content=b"{nope", headers=headers)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.get(guard.base_url + "/nothing-here", headers=headers)
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_upstream_validation_errors_pass_through_as_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="teacher", prompt="x " * 400, max_tokens=10)
    _assert_openai_shape(caught.value)
