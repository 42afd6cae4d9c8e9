"""What the logprob channel reveals per tier, end to end through real vLLM and the SDK."""

from __future__ import annotations

import math

import openai
import pytest

from guard_server.teacher.task import completion_prompt, make_problems
from guard_server.testing import ALICE_KEY, BOB_KEY, GuardProcess

QUESTION = make_problems(1, seed=21, split="heldout")[0].question
MESSAGES = [{"role": "user", "content": QUESTION}]


def _sdk(guard: GuardProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


def _chat_logprobs(sdk: openai.OpenAI, stream: bool = False) -> list[list[tuple[str, float]]]:
    """Per position: [(sampled token, value), (top token, value), ...]."""
    kwargs = {"model": "teacher", "messages": MESSAGES, "temperature": 0, "logprobs": True,
              "top_logprobs": 5, "max_tokens": 24}  # fmt: skip
    items = []
    if stream:
        for chunk in sdk.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                items.extend(choice.logprobs.content or [] if choice.logprobs else [])
    else:
        reply = sdk.chat.completions.create(**kwargs)
        items = reply.choices[0].logprobs.content
    return [
        [(item.token, item.logprob)] + [(top.token, top.logprob) for top in item.top_logprobs]
        for item in items
    ]


def test_same_client_same_prompt_gets_the_same_noisy_values(guard: GuardProcess) -> None:
    alice = _sdk(guard, ALICE_KEY)
    assert _chat_logprobs(alice) == _chat_logprobs(alice)


def test_stream_and_whole_answer_carry_the_same_values(guard: GuardProcess) -> None:
    alice = _sdk(guard, ALICE_KEY)
    assert _chat_logprobs(alice, stream=True) == _chat_logprobs(alice)


def test_another_client_gets_other_noise(guard: GuardProcess) -> None:
    alice, bob = _chat_logprobs(_sdk(guard, ALICE_KEY)), _chat_logprobs(_sdk(guard, BOB_KEY))
    assert [tokens for tokens in alice] != [tokens for tokens in bob]


def _on_grid(value: float) -> bool:
    return abs(value * 2 - round(value * 2)) < 1e-9  # the default tier's 0.5 grid


def test_default_tier_values_are_hardened_as_promised(
    guard: GuardProcess, trusted_client: openai.OpenAI
) -> None:
    positions = _chat_logprobs(_sdk(guard, ALICE_KEY))
    raw = [item.logprob for item in _trusted_chat(trusted_client).choices[0].logprobs.content]
    assert positions and len(positions) == len(raw)
    exact = 0
    for position, raw_value in zip(positions, raw, strict=True):
        sampled_token, sampled_value = position[0]
        top = position[1:]
        assert 1 <= len(top) <= 5
        values = [value for _, value in top]
        assert all(math.isfinite(v) and v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-9
        assert values == sorted(values, reverse=True)
        assert dict(top).get(sampled_token, sampled_value) == sampled_value
        if math.exp(raw_value) >= 0.9:  # exact_sampled_above: 0.9
            exact += 1
            assert sampled_value == raw_value
            assert top[0] == (sampled_token, sampled_value)
            assert all(_on_grid(v) for v in values[1:])
        else:
            assert all(_on_grid(v) for v in values)
    assert 0 < exact < len(positions)  # this answer has both kinds of position


def _trusted_chat(trusted_client: openai.OpenAI, max_tokens: int = 24):
    return trusted_client.chat.completions.create(
        model="teacher", messages=MESSAGES, temperature=0, logprobs=True, top_logprobs=5,
        max_tokens=max_tokens,
    )  # fmt: skip


def test_trusted_tier_gets_raw_values(trusted_client: openai.OpenAI) -> None:
    reply = _trusted_chat(trusted_client, max_tokens=8)
    values = [
        top.logprob for item in reply.choices[0].logprobs.content for top in item.top_logprobs
    ]
    assert any(abs(v * 2 - round(v * 2)) > 1e-6 for v in values)


def test_completions_logprobs_are_hardened_and_capped(guard: GuardProcess) -> None:
    raw = _sdk(guard, ALICE_KEY).completions.with_raw_response.create(
        model="teacher", prompt=completion_prompt(QUESTION), max_tokens=12, temperature=0,
        logprobs=20,
    )  # fmt: skip
    header = raw.headers["x-guard-policy"]
    assert "clamped=logprobs" in header and "hardened=logprobs" in header
    logprobs = raw.parse().choices[0].logprobs
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) <= 6
        assert top.get(token, value) == value
        others = [v for t, v in top.items() if t != token]
        assert all(v <= 0 and _on_grid(v) for v in others)
        assert _on_grid(value) or value >= math.log(0.9)  # hardened, or exact and confident


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"5": 2}, "logprobs": True, "top_logprobs": 2}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(11)}}, "logit_bias"),
        ({"logprob_token_ids": [5]}, "logprob_token_ids"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"echo": True}, "echo"),
        ({"n": 8}, "n"),
    ],
)
def test_leak_paths_get_the_policy_answer(guard: GuardProcess, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _sdk(guard, ALICE_KEY).chat.completions.create(
            model="teacher", messages=MESSAGES, max_tokens=2, extra_body=extra
        )
    assert caught.value.response.json()["error"]["param"] == param


def test_all_logprobs_request_is_clamped(guard: GuardProcess) -> None:
    raw = _sdk(guard, ALICE_KEY).chat.completions.with_raw_response.create(
        model="teacher", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=-1
    )
    assert "clamped=top_logprobs" in raw.headers["x-guard-policy"]
    assert all(len(item.top_logprobs) <= 5 for item in raw.parse().choices[0].logprobs.content)


def test_large_logit_bias_is_clamped_in_magnitude(guard: GuardProcess) -> None:
    raw = _sdk(guard, ALICE_KEY).chat.completions.with_raw_response.create(
        model="teacher", messages=MESSAGES, max_tokens=3, logit_bias={"5": -100}
    )
    assert "clamped=logit_bias" in raw.headers["x-guard-policy"]


def test_client_seed_is_rekeyed_yet_reproducible(guard: GuardProcess) -> None:
    alice = _sdk(guard, ALICE_KEY)

    def sample() -> tuple[str, str]:
        raw = alice.completions.with_raw_response.create(
            model="teacher", prompt=completion_prompt(QUESTION), max_tokens=16, temperature=1.0,
            seed=1234,
        )  # fmt: skip
        return raw.headers["x-guard-policy"], raw.parse().choices[0].text

    (header, first), (_, second) = sample(), sample()
    assert "rekeyed=seed" in header
    assert first == second
