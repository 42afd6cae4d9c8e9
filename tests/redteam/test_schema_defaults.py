"""Found by reading the code: a tier that left keys out got no bounds, 20 top logprobs, no
noise, `echo`, `logit_bias` up to +/-100 and `seed: allow`. Now every key left out takes its
safe value; the `rt-bare` tier sets nothing but its fields (detection off, so no action of
the detector moves its plan)."""

from __future__ import annotations

import math
from typing import Any

import httpx

from guard_server.testing import GuardProcess
from tests.redteam.conftest import post

CHAT = {"model": "teacher", "messages": [{"role": "user", "content": "1 plus 2"}]}


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


def _refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def _chat(guard: GuardProcess, **fields: Any) -> httpx.Response:
    return post(guard, "rt-bare", "/chat/completions", {**CHAT, "max_tokens": 4, **fields})


def _completion(guard: GuardProcess, **fields: Any) -> httpx.Response:
    body = {"model": "teacher", "prompt": "1 plus 2", "max_tokens": 4, **fields}
    return post(guard, "rt-bare", "/completions", body)


def test_logprobs_are_capped_and_hardened(rt_guard: GuardProcess) -> None:
    response = _ok(_chat(rt_guard, logprobs=True, top_logprobs=20))
    assert "clamped=top_logprobs" in response.headers["x-guard-policy"]
    for item in response.json()["choices"][0]["logprobs"]["content"]:
        assert len(item["top_logprobs"]) <= 5
        for value in [item["logprob"], *(top["logprob"] for top in item["top_logprobs"])]:
            assert math.isclose(value * 2, round(value * 2))  # noise on a 0.5 grid, none exact
    prompt = _ok(_completion(rt_guard, prompt_logprobs=20))
    assert "clamped=prompt_logprobs" in prompt.headers["x-guard-policy"]


def test_echo_with_logprobs_and_unbounded_fields_are_refused(rt_guard: GuardProcess) -> None:
    _refused(_completion(rt_guard, echo=True, logprobs=1), "echo")
    _refused(_chat(rt_guard, n=5), "n")
    _refused(_chat(rt_guard, temperature=3), "temperature")
    _refused(_completion(rt_guard, prompt=["a", "b", "c", "d", "e"]), "prompt")
    clamped = _ok(_chat(rt_guard, max_tokens=100_000))
    assert "clamped=max_tokens" in clamped.headers["x-guard-policy"]


def test_logit_bias_is_limited(rt_guard: GuardProcess) -> None:
    _refused(_chat(rt_guard, logit_bias={str(i): 1 for i in range(11)}), "logit_bias")
    _refused(_chat(rt_guard, logit_bias={"5": 1}, logprobs=True), "logit_bias")
    clamped = _ok(_chat(rt_guard, logit_bias={"5": 50}))
    assert "clamped=logit_bias" in clamped.headers["x-guard-policy"]


def test_seed_is_rekeyed_and_constraints_and_parts_are_refused(rt_guard: GuardProcess) -> None:
    assert "rekeyed=seed" in _ok(_chat(rt_guard, seed=7)).headers["x-guard-policy"]
    regex = {"regex": "[AZ]"}
    _refused(_chat(rt_guard, logprobs=True, structured_outputs=regex), "structured_outputs")
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}
    _refused(_chat(rt_guard, messages=[{"role": "user", "content": [image]}]), "messages")
