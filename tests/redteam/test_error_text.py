"""Red team: vLLM's error text never reaches the client.

Before, ``stop_token_ids: [999999]`` answered "... Vocabulary size: 512 ...", a too-long
prompt named the context length, a logprobs count above vLLM's cap named the cap, and
validation errors came back as pydantic dumps; ``system_fingerprint`` named vLLM's version.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import DEMO_KEY, POLICIES, TRUSTED_KEY, GuardProcess, write_test_config

WIDE_KEY = "sk-test-wide-logprobs"
# What vLLM's messages say about the bundled teacher and the server (vocabulary 512,
# context 256, --max-logprobs 20), and the words that give the upstream away.
MODEL_FACTS = re.compile(
    r"512|256|\b20\b|vocab|max_model_len|context length|vllm|pydantic|Bad Request|"
    r"validation error|\{'type'|body\.|--|/work|\.py",
    re.I,
)
CHAT = [{"role": "user", "content": "What is 1 + 2?"}]


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory, vllm_url: str):  # type: ignore[no-untyped-def]
    """A guard with the repo's policies, and a tier whose logprob cap is above vLLM's."""
    directory = tmp_path_factory.mktemp("error-text")
    trusted = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]["trusted"]
    wide = {**trusted, "logprobs": {"max_top": 50}}
    policy = {
        "tiers": {"wide": wide},
        "clients": {"wide": {"tier": "wide", "keys": [hash_key(WIDE_KEY)]}},
    }
    (directory / "wide.yaml").write_text(yaml.safe_dump(policy))
    policies = [str(POLICIES / f) for f in ("default.yaml", "demo-clients.yaml")]
    config = write_test_config(
        directory, [vllm_url], policies=[*policies, str(directory / "wide.yaml")]
    )
    process = GuardProcess(config, directory / "guard.log").start()
    process.wait_ready()
    try:
        yield process
    finally:
        process.stop()


def _sdk(guard: GuardProcess, key: str = DEMO_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


def _rejected(call) -> dict:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert not MODEL_FACTS.search(error["message"]), error["message"]
    return error


def test_an_out_of_vocabulary_stop_token_is_refused_in_the_guards_words(guard) -> None:  # type: ignore[no-untyped-def]
    error = _rejected(
        lambda: _sdk(guard).completions.create(
            model="teacher", prompt="hi", max_tokens=2, extra_body={"stop_token_ids": [999999]}
        )
    )
    assert error["param"] == "stop_token_ids"
    assert error["code"] == "invalid_token_id"
    assert "token id" in error["message"]


def test_a_context_overflow_names_no_length(guard) -> None:  # type: ignore[no-untyped-def]
    error = _rejected(
        lambda: _sdk(guard).completions.create(model="teacher", prompt="x " * 400, max_tokens=10)
    )
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    error = _rejected(
        lambda: _sdk(guard).chat.completions.create(
            model="teacher", messages=CHAT, max_tokens=2, extra_body={"truncate_prompt_tokens": 999}
        )
    )
    assert error["param"] == "truncate_prompt_tokens"


def test_a_logprobs_count_above_the_servers_cap_names_no_cap(guard) -> None:  # type: ignore[no-untyped-def]
    error = _rejected(
        lambda: _sdk(guard, WIDE_KEY).chat.completions.create(
            model="teacher", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=30
        )
    )
    assert (error["param"], error["code"]) == ("top_logprobs", "value_out_of_range")
    error = _rejected(
        lambda: _sdk(guard, WIDE_KEY).completions.create(
            model="teacher", prompt="hi", max_tokens=2, logprobs=30
        )
    )
    assert error["param"] == "logprobs"


def test_a_validation_dump_becomes_one_sentence_naming_the_field(guard) -> None:  # type: ignore[no-untyped-def]
    error = _rejected(
        lambda: _sdk(guard).chat.completions.create(
            model="teacher", messages=CHAT, max_tokens=2, response_format={"type": "bogus"}
        )
    )
    assert error["param"] == "response_format.type"
    assert error["message"].count("\n") == 0


def test_system_fingerprint_is_the_guards_own_by_default(guard) -> None:  # type: ignore[no-untyped-def]
    first = _sdk(guard).chat.completions.create(model="teacher", messages=CHAT, max_tokens=2)
    again = _sdk(guard, TRUSTED_KEY).completions.create(model="teacher", prompt="hi", max_tokens=2)
    assert re.fullmatch(r"fp_[0-9a-f]{10}", first.system_fingerprint or "")
    assert again.system_fingerprint == first.system_fingerprint  # per model, not per client
    stream = _sdk(guard).chat.completions.create(
        model="teacher", messages=CHAT, max_tokens=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    stamped = {chunk.system_fingerprint for chunk in stream} - {None}
    assert stamped == {first.system_fingerprint}


def test_system_fingerprint_can_pass_or_be_set(tmp_path: Path, vllm_url: str) -> None:
    upstream = {"urls": [vllm_url], "system_fingerprint": "pass"}
    config = write_test_config(
        tmp_path,
        [vllm_url],
        upstreams={"teacher": upstream},
        server={"system_fingerprint": "fp_operator"},
    )
    guard = GuardProcess(config, tmp_path / "guard.log").start()
    try:
        body = {"model": "teacher", "prompt": "hi", "max_tokens": 2}
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
        passed = httpx.post(guard.base_url + "/completions", json=body, headers=headers).json()
        assert passed["system_fingerprint"].startswith("vllm-")  # the model's own setting wins
    finally:
        guard.stop()
    config = write_test_config(tmp_path, [vllm_url], server={"system_fingerprint": "fp_operator"})
    guard = GuardProcess(config, tmp_path / "guard2.log").start()
    try:
        body = {"model": "teacher", "prompt": "hi", "max_tokens": 2}
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
        fixed = httpx.post(guard.base_url + "/completions", json=body, headers=headers).json()
        assert fixed["system_fingerprint"] == "fp_operator"
    finally:
        guard.stop()
