"""Detection end to end: admin API, decoys and blocks, through real vLLM and the SDK."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.teacher.task import check, extract_answer, make_problems
from guard_server.testing import (
    POLICIES,
    TRUSTED_KEY,
    GuardProcess,
    metric_value,
    write_test_config,
)

ADMIN_KEY = "sk-admin-test"
ATTACKER_KEY = "sk-test-attacker"
HONEST_KEY = "sk-test-honest"


def _guard(
    tmp_path: Path, vllm_url: str, thresholds: dict, audit: Path | None = None
) -> GuardProcess:
    default = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]["default"]
    policy = {
        "tiers": {"watched": {**default, "detection": {"thresholds": thresholds}}},
        "clients": {
            "attacker": {"tier": "watched", "keys": [hash_key(ATTACKER_KEY)]},
            "honest": {"tier": "watched", "keys": [hash_key(HONEST_KEY)]},
        },
    }
    path = tmp_path / "watched.yaml"
    path.write_text(yaml.safe_dump(policy))
    overrides: dict = {
        "policies": [
            str(POLICIES / "default.yaml"),
            str(POLICIES / "demo-clients.yaml"),
            str(path),
        ],
        "admin": {"key_hash": hash_key(ADMIN_KEY)},
    }
    if audit is not None:
        overrides["audit"] = {"path": str(audit)}
    config = write_test_config(tmp_path, [vllm_url], **overrides)
    return GuardProcess(config, tmp_path / "g.log").start()


def _report(guard: GuardProcess, client: str) -> dict:
    response = httpx.get(
        f"{guard.url}/admin/clients/{client}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_admin_api_needs_its_own_key(tmp_path: Path, vllm_url: str) -> None:
    guard = _guard(tmp_path, vllm_url, {})
    try:
        url = f"{guard.url}/admin/clients/attacker"
        assert httpx.get(url).status_code == 401
        assert (
            httpx.get(url, headers={"Authorization": f"Bearer {ATTACKER_KEY}"}).status_code == 401
        )
        assert httpx.get(url, headers={"Authorization": f"Bearer {TRUSTED_KEY}"}).status_code == 401
        assert _report(guard, "attacker")["action"] == "pass"
        missing = httpx.get(
            f"{guard.url}/admin/clients/nobody", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert missing.status_code == 404
    finally:
        guard.stop()


def test_a_logprob_harvester_is_flagged_then_decoyed_while_an_honest_client_is_not(
    tmp_path: Path, vllm_url: str
) -> None:
    # Asking for the maximal top-k from the first request scores 0.30 at once; clockwork
    # timing or (from 100 requests) all-new prompts take the harvester past 0.36.
    thresholds = {"tighten": 0.32, "perturb": 0.34, "decoy": 0.36, "block": 1.0}
    audit = tmp_path / "audit.jsonl"
    guard = _guard(tmp_path, vllm_url, thresholds, audit)
    try:
        attacker = openai.OpenAI(base_url=guard.base_url, api_key=ATTACKER_KEY, max_retries=0)
        honest = openai.OpenAI(base_url=guard.base_url, api_key=HONEST_KEY, max_retries=0)
        problems = make_problems(120, seed=99, split="heldout")
        for i, problem in enumerate(problems):
            attacker.chat.completions.create(
                model="teacher", messages=[{"role": "user", "content": problem.question}],
                max_tokens=24, temperature=0, logprobs=True, top_logprobs=5,
            )  # fmt: skip
            if i % 10 == 0:
                honest.chat.completions.create(
                    model="teacher", messages=[{"role": "user", "content": problems[0].question}],
                    max_tokens=24,
                )  # fmt: skip
        report = _report(guard, "attacker")
        assert report["action"] == "decoy", report
        assert report["signals"]["max_top_logprobs"] > 0.1
        assert _report(guard, "honest")["action"] == "pass"

        # The decoy looks like an answer but is wrong (the real model's answer to the question
        # with its digits permuted, mapped back: guard_server.defences.decoy), and the same
        # wrong answer again when asked again.
        question = [{"role": "user", "content": problems[1].question}]
        trusted = openai.OpenAI(base_url=guard.base_url, api_key=TRUSTED_KEY, max_retries=0)
        truth = trusted.chat.completions.create(
            model="teacher", messages=question, max_tokens=24, temperature=0
        )
        decoy = attacker.chat.completions.create(
            model="teacher", messages=question, max_tokens=24, temperature=0
        )
        again = attacker.chat.completions.create(
            model="teacher", messages=question, max_tokens=24, temperature=0
        )
        true_text = truth.choices[0].message.content or ""
        decoy_text = decoy.choices[0].message.content or ""
        assert check(problems[1], true_text)
        assert extract_answer(decoy_text) and not check(problems[1], decoy_text)
        assert re.sub(r"\d+", "#", true_text) == re.sub(r"\d+", "#", decoy_text)
        assert again.choices[0].message.content == decoy_text
        assert decoy.usage.prompt_tokens == truth.usage.prompt_tokens
        assert metric_value(guard.metrics(), "guard_decoys_served_total") >= 2

        time.sleep(0.2)
        lines = [yaml.safe_load(line) for line in audit.read_text().splitlines()]
        assert {line["action"] for line in lines if line["client"] == "attacker"} >= {
            "pass",
            "decoy",
        }
        assert all("prompt" not in line and line["request_hash"] for line in lines)
    finally:
        guard.stop()


def test_block_level_gets_403(tmp_path: Path, vllm_url: str) -> None:
    guard = _guard(tmp_path, vllm_url, {"tighten": 0, "perturb": 0, "decoy": 0, "block": 0})
    try:
        attacker = openai.OpenAI(base_url=guard.base_url, api_key=ATTACKER_KEY, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            attacker.completions.create(model="teacher", prompt="hi", max_tokens=2)
        assert caught.value.response.json()["error"]["code"] == "access_suspended"
    finally:
        guard.stop()
