"""``/v1/responses`` under the defences that need a running guard: a flagged client gets the
misinformation decoy on the output text, whole and streamed alike, and nothing in the
Response object tells it so (the audit log and the token counts see the request like a chat
one); the plugin's keyed sampling noise reaches vLLM through ``vllm_xargs``, seeded by the
same identity as the equivalent chat request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from guard_server.canonical import canonical_input
from guard_server.defences.keys import sampling_noise_seed
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.auth import hash_key
from guard_server.teacher.task import make_problems
from guard_server.testing import (
    POLICIES,
    TRUSTED_KEY,
    GuardProcess,
    metric_value,
    write_test_config,
)

ADMIN_KEY = "sk-admin-responses"
SECRET = "responses-test-secret-0123456789abcdef"
KEY = "sk-test-responses-flagged"
NOISY_KEY = "sk-test-responses-noisy"
# Maximal top-k logprobs score 0.30 from the first request: past `decoy` at once.
THRESHOLDS = {"tighten": 0.2, "perturb": 0.25, "decoy": 0.28, "block": 0.9}
PROBLEMS = make_problems(4, seed=21, split="heldout")
LOGPROBS = ["message.output_text.logprobs"]
INSTRUCTIONS = "Answer in 1 sentence."


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory, vllm_url: str) -> Iterator[GuardProcess]:
    directory = tmp_path_factory.mktemp("responses-decoy")
    default = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]["default"]
    policy = {
        "tiers": {
            "watched": {**default, "detection": {"thresholds": THRESHOLDS, "evidence_min": 0.2}},
            "noisy": {**default, "sampling": {"noise": {"sigma": 8}}},
        },
        "clients": {
            "flagged": {"tier": "watched", "keys": [hash_key(KEY)]},
            "noisy": {"tier": "noisy", "keys": [hash_key(NOISY_KEY)]},
        },
    }
    (directory / "watched.yaml").write_text(yaml.safe_dump(policy))
    config = write_test_config(
        directory,
        [vllm_url],
        policies=[str(POLICIES / f) for f in ("default.yaml", "demo-clients.yaml")]
        + [str(directory / "watched.yaml")],
        admin={"key_hash": hash_key(ADMIN_KEY)},
        secret={"env": "GUARD_TEST_RESPONSES_SECRET"},
        upstreams={"teacher": {"urls": [vllm_url], "guard_plugin": True, "health_interval_s": 0.5}},
        audit={"path": str(directory / "audit.jsonl")},
    )
    process = GuardProcess(config, directory / "guard.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GUARD_TEST_RESPONSES_SECRET", SECRET)
        process.start()
    try:
        yield process
    finally:
        process.stop()


def _sdk(guard: GuardProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


def _ask(sdk: openai.OpenAI, question: str, **extra):  # type: ignore[no-untyped-def]
    return sdk.responses.create(
        model="teacher",
        instructions=INSTRUCTIONS,
        input=question,
        max_output_tokens=24,
        temperature=0,
        include=LOGPROBS,
        top_logprobs=5,  # the tier's maximum: the flagged client stays flagged
        **extra,
    )


def test_a_flagged_client_gets_the_decoy_on_plain_and_streamed_answers(
    guard: GuardProcess,
) -> None:
    flagged, trusted = _sdk(guard, KEY), _sdk(guard, TRUSTED_KEY)
    _ask(flagged, "hi")
    report = httpx.get(
        f"{guard.url}/admin/clients/flagged", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    assert report["action"] == "decoy", report
    tokens_before = metric_value(guard.metrics(), "guard_completion_tokens_total", tier="watched")
    differ = 0
    for problem in PROBLEMS:
        truth = _ask(trusted, problem.question)
        decoyed = _ask(flagged, problem.question)
        differ += decoyed.output_text != truth.output_text
        # the logprobs' tokens are the text's, mapped alike
        logprobs = decoyed.output[0].content[0].logprobs or []
        assert "".join(p.token for p in logprobs).removesuffix("</s>") == decoyed.output_text
        # the echo of the request is what the client sent, not the permuted world's
        assert decoyed.instructions == INSTRUCTIONS and decoyed.temperature == 0
        streamed, final = "", None
        for event in _ask(flagged, problem.question, stream=True):
            if event.type == "response.output_text.delta":
                streamed += event.delta
            elif event.type in ("response.completed", "response.incomplete"):
                final = event.response
        assert streamed == decoyed.output_text
        assert final is not None and final.output_text == streamed
        assert final.instructions == INSTRUCTIONS
    assert differ >= len(PROBLEMS) // 2  # arithmetic answers: the digits are remapped
    time.sleep(0.2)
    audit = [
        json.loads(line) for line in (guard.config.parent / "audit.jsonl").read_text().splitlines()
    ]
    requests = [r for r in audit if r.get("event") == "request" and r["client"] == "flagged"]
    assert requests[-1]["endpoint"] == "responses" and requests[-1]["action"] == "decoy"
    tokens_after = metric_value(guard.metrics(), "guard_completion_tokens_total", tier="watched")
    assert tokens_after > tokens_before  # usage from the Response object is counted


def test_the_plugins_noise_reaches_vllm_keyed_like_chat(guard: GuardProcess, vllm_url: str) -> None:
    noisy = _sdk(guard, NOISY_KEY)
    for problem in PROBLEMS[:2]:
        sampled = _tokens(
            noisy.responses.create(
                model="teacher",
                input=problem.question,
                max_output_tokens=12,
                temperature=0,
                include=LOGPROBS,
            )
        )
        # the seed the guard sends is the one of the equivalent chat request's identity
        chat = {"model": "teacher", "messages": [{"role": "user", "content": problem.question}]}
        identity = canonical_input(Endpoint.CHAT, chat).identities[0]
        seed = sampling_noise_seed(SECRET.encode(), "noisy", identity)
        xargs = {"guard_noise_seed": seed, "guard_noise_sigma": 8.0, "guard_noise_kind": "gumbel"}
        direct = httpx.post(
            vllm_url + "/v1/responses",
            json={"model": "teacher", "input": problem.question, "max_output_tokens": 12,
                  "temperature": 0, "include": LOGPROBS, "store": False, "vllm_xargs": xargs},
            timeout=60,
        ).json()  # fmt: skip
        tokens = [p["token"] for p in direct["output"][0]["content"][0]["logprobs"]]
        assert sampled == tokens
        plain = httpx.post(
            vllm_url + "/v1/responses",
            json={"model": "teacher", "input": problem.question, "max_output_tokens": 12,
                  "temperature": 0, "include": LOGPROBS, "store": False},
            timeout=60,
        ).json()  # fmt: skip
        assert sampled != [p["token"] for p in plain["output"][0]["content"][0]["logprobs"]]


def _tokens(response) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.token for p in response.output[0].content[0].logprobs or ()]
