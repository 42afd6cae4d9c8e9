"""Found by reading the code: `prompt_logprobs` values were never hardened on tiers that
allow them. Now they get the tier's hardening under a key of their own (client and prompt):
on the grid, the same on every repeat, ranks and tokens untouched, and a confident prompt
token's own value exact as `exact_sampled_above` says."""

from __future__ import annotations

import math
from typing import Any

from guard_server.teacher.task import completion_prompt, make_problems
from guard_server.testing import TRUSTED_KEY, GuardProcess
from tests.redteam.conftest import post

PROMPT = completion_prompt(make_problems(1, seed=61, split="heldout")[0].question)
EXACT_ABOVE = math.log(0.9)  # the default tier's exact_sampled_above


def _completion(guard: GuardProcess, client: str) -> list[Any]:
    body = {"model": "teacher", "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2}
    response = post(guard, client, "/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["prompt_logprobs"]


def _chat(guard: GuardProcess, client: str) -> list[Any]:
    body = {
        "model": "teacher",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1,
        "prompt_logprobs": 2,
    }
    response = post(guard, client, "/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["prompt_logprobs"]


def _check_hardened(hardened: list[Any], raw: list[Any]) -> None:
    assert len(hardened) == len(raw) > 3 and hardened[0] is None
    changed = 0
    for position, raw_position in zip(hardened[1:], raw[1:], strict=True):
        assert list(position) == list(raw_position)  # the same token ids, prompt token first
        for token_id, entry in position.items():
            original = raw_position[token_id]
            assert entry["rank"] == original["rank"]
            assert entry["decoded_token"] == original["decoded_token"]
            prompt_token = token_id == next(iter(position))
            if prompt_token and original["logprob"] >= EXACT_ABOVE:
                assert entry["logprob"] == original["logprob"]
            else:
                assert math.isclose(entry["logprob"] * 2, round(entry["logprob"] * 2))
                changed += entry["logprob"] != original["logprob"]
    assert changed > 0


def test_completions_prompt_logprobs_are_hardened(rt_guard: GuardProcess) -> None:
    hardened = _completion(rt_guard, "rt-lp")
    _check_hardened(hardened, _completion(rt_guard, TRUSTED_KEY))
    assert _completion(rt_guard, "rt-lp") == hardened  # nothing to average


def test_chat_prompt_logprobs_are_hardened(rt_guard: GuardProcess) -> None:
    hardened = _chat(rt_guard, "rt-lp")
    _check_hardened(hardened, _chat(rt_guard, TRUSTED_KEY))
    assert _chat(rt_guard, "rt-lp") == hardened
