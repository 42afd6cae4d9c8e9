"""Issue 16, item 1: noise keyed on bytes the model ignores.

A key vLLM drops from a message (`"nonce": "17"`) is refused by name; every other change
that leaves the model input alone (key order, defaults spelled out, `user`, `stream`, a
string against text parts, a `name` the teacher's template never renders) gets the very
same hardened values, so averaging such requests gains nothing.
"""

from __future__ import annotations

import statistics
from typing import Any

import openai
import pytest

from guard_server.teacher.task import make_problems
from guard_server.testing import TRUSTED_KEY, GuardProcess
from tests.redteam.conftest import post, sdk, upstream_calls

QUESTION = make_problems(1, seed=31, split="heldout")[0].question


def _values(reply: dict[str, Any]) -> list[list[tuple[str, float]]]:
    return [
        [(item["token"], item["logprob"])]
        + [(top["token"], top["logprob"]) for top in item["top_logprobs"]]
        for item in reply["choices"][0]["logprobs"]["content"]
    ]


def _ask(
    guard: GuardProcess, message: dict[str, Any], client: str = "rt-quiet", **fields: Any
) -> list:
    body = {
        "model": "teacher",
        "messages": [message],
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 5,
        **fields,
    }
    response = post(guard, client, "/chat/completions", body)
    assert response.status_code == 200, response.text
    return _values(response.json())


def test_a_key_the_model_never_sees_is_refused_by_name(rt_guard: GuardProcess) -> None:
    before = upstream_calls(rt_guard)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(rt_guard, "rt-quiet").chat.completions.create(
            model="teacher",
            messages=[{"role": "user", "content": QUESTION, "nonce": "17"}],  # type: ignore[misc]
            logprobs=True,
            top_logprobs=5,
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert "`nonce`" in error["message"] and error["param"] == "messages[0]"
    assert error["code"] == "unknown_parameter"
    null_name = {"role": "user", "content": QUESTION, "name": None}  # vLLM's types refuse it
    response = post(
        rt_guard, "rt-quiet", "/chat/completions", {"model": "teacher", "messages": [null_name]}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].name"
    assert upstream_calls(rt_guard) == before  # refused by the guard, never sent


def test_ignored_bytes_give_identical_hardened_values(rt_guard: GuardProcess) -> None:
    plain = _ask(rt_guard, {"role": "user", "content": QUESTION})
    variants = [
        _ask(rt_guard, {"content": QUESTION, "role": "user"}),
        _ask(rt_guard, {"role": "user", "content": [{"type": "text", "text": QUESTION}]}),
        _ask(rt_guard, {"role": "user", "content": QUESTION, "name": "n-1"}),
        _ask(rt_guard, {"role": "user", "content": QUESTION}, user="u-2", seed=None),
        _ask(rt_guard, {"role": "user", "content": QUESTION}, add_generation_prompt=True),
        _ask(rt_guard, {"role": "user", "content": QUESTION}, max_tokens=8, top_p=1.0),
    ]
    for variant in variants:
        assert variant == plain
    # The values are hardened, not the raw ones the trusted tier sees.
    assert plain != _ask(rt_guard, {"role": "user", "content": QUESTION}, client=TRUSTED_KEY)


def test_averaging_sixteen_nonce_variants_gains_nothing(rt_guard: GuardProcess) -> None:
    """The attack of the issue: average many variants to shrink the noise. Every variant
    now returns the same numbers, so the average is the single answer (spread zero)."""
    answers = [
        _ask(rt_guard, {"role": "user", "content": QUESTION, "name": f"nonce-{i}"}, user=str(i))
        for i in range(16)
    ]
    first_position = [dict(answer[0]) for answer in answers]
    for token in first_position[0]:
        spread = statistics.pstdev(position[token] for position in first_position)
        assert spread == 0.0
