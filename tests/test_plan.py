"""One plan per request: the audit log and the metrics record the action taken, whatever the
answer (200, 429 or 403), and shadow mode records the same actions while acting on nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.teacher.task import make_problems
from guard_server.testing import (
    POLICIES,
    TRUSTED_KEY,
    GuardProcess,
    metric_value,
    write_test_config,
)

ATTACKER_KEY = "sk-test-plan-attacker"
HONEST_KEY = "sk-test-plan-honest"
# Fewer than 20 requests per client, so timing regularity never scores and the run is
# deterministic: only the attacker's switch to maximal top-k logprobs moves its risk. After
# 8 plain requests, its k-th logprob request scores 0.036, 0.065, 0.089, 0.108, 0.125,
# 0.139, 0.151, 0.162, 0.172, ...: through every threshold in turn.
THRESHOLDS = {"tighten": 0.03, "perturb": 0.08, "decoy": 0.12, "block": 0.165}
PROBLEMS = make_problems(30, seed=41, split="heldout")


def _guard(tmp_path: Path, vllm_url: str, mode: str, requests_per_minute: int) -> GuardProcess:
    default = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]["default"]
    tier = {
        **default,
        "detection": {"mode": mode, "thresholds": THRESHOLDS},
        "limits": {"requests_per_minute": requests_per_minute},
    }
    policy = {
        "tiers": {"watched": tier},
        "clients": {
            "attacker": {"tier": "watched", "keys": [hash_key(ATTACKER_KEY)]},
            "honest": {"tier": "watched", "keys": [hash_key(HONEST_KEY)]},
        },
    }
    path = tmp_path / "watched.yaml"
    path.write_text(yaml.safe_dump(policy))
    config = write_test_config(
        tmp_path,
        [vllm_url],
        policies=[str(POLICIES / "default.yaml"), str(POLICIES / "demo-clients.yaml"), str(path)],
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    return GuardProcess(config, tmp_path / "guard.log").start()


def _ask(http: httpx.Client, key: str, index: int, logprobs: bool) -> httpx.Response:
    body: dict = {
        "model": "teacher",
        "messages": [{"role": "user", "content": PROBLEMS[index].question}],
        "max_tokens": 8,
        "temperature": 0,
    }
    if logprobs:
        body.update(logprobs=True, top_logprobs=5)
    return http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def _run_traffic(guard: GuardProcess) -> list[httpx.Response]:
    """The same scripted traffic every time: the attacker asks 8 plain questions, then 11
    with maximal logprobs; the honest client asks a plain question after every other one."""
    responses = []
    with httpx.Client(base_url=guard.base_url, timeout=60) as http:
        for i in range(19):
            responses.append(_ask(http, ATTACKER_KEY, i, logprobs=i >= 8))
            if i % 2:
                responses.append(_ask(http, HONEST_KEY, 0, logprobs=False))
    return responses


def _audit(tmp_path: Path) -> list[dict]:
    time.sleep(0.2)
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory, vllm_url: str):
    """One scripted run against a guard that enforces: (answers, audit lines, metrics)."""
    tmp_path = tmp_path_factory.mktemp("enforce")
    guard = _guard(tmp_path, vllm_url, "enforce", requests_per_minute=20)
    try:
        responses = _run_traffic(guard)
        return responses, _audit(tmp_path), guard.metrics()
    finally:
        guard.stop()


def test_audit_and_metrics_record_the_action_taken_for_200_429_and_403(enforced) -> None:
    responses, lines, metrics = enforced
    assert len(lines) == len(responses)  # one decision per request, refused ones too
    statuses = {}
    for response, line in zip(responses, lines, strict=True):
        assert line["status"] == response.status_code
        assert line["mode"] == "enforce" and line["assessed"] == line["action"]
        assert line["reason"]
        statuses.setdefault(line["action"], set()).add(line["status"])
    # The attacker climbs through every action; tightened limits (20 → 5 a minute) start
    # refusing it with 429 before it reaches block, which is 403.
    assert set(statuses) == {"pass", "tighten", "perturb", "decoy", "block"}
    assert statuses["block"] == {403}
    assert 429 in set().union(*statuses.values()) - {403}
    assert all(line["action"] == "pass" for line in lines if line["client"] == "honest")
    for action in statuses:
        counted = metric_value(
            metrics, "guard_actions_total", tier="watched", action=action, mode="enforce"
        )
        assert counted == sum(line["action"] == action for line in lines)
    decoys = sum(line["action"] == "decoy" and line["status"] == 200 for line in lines)
    assert metric_value(metrics, "guard_decoys_served_total") == decoys > 0
    blocked = next(r for r in responses if r.status_code == 403)
    assert blocked.json()["error"]["code"] == "access_suspended"


def test_shadow_mode_records_the_same_actions_and_acts_on_none(
    enforced, tmp_path: Path, vllm_url: str
) -> None:
    _, enforced_lines, _ = enforced
    guard = _guard(tmp_path, vllm_url, "shadow", requests_per_minute=20)
    try:
        responses = _run_traffic(guard)
        metrics = guard.metrics()
        with httpx.Client(base_url=guard.base_url, timeout=60) as http:
            question = {"role": "user", "content": PROBLEMS[3].question}
            body = {"model": "teacher", "messages": [question], "max_tokens": 8, "temperature": 0}
            seen = http.post("/chat/completions", json=body, headers=_bearer(ATTACKER_KEY))
            truth = http.post("/chat/completions", json=body, headers=_bearer(TRUSTED_KEY))
    finally:
        guard.stop()
    lines = _audit(tmp_path)
    would_be = [(line["client"], line["assessed"]) for line in lines[: len(responses)]]
    taken = [(line["client"], line["action"]) for line in enforced_lines]
    assert would_be == taken
    # Acted on nothing: every request served (no tightened limit, no block), no decoy.
    assert {response.status_code for response in responses} == {200}
    assert {line["action"] for line in lines} == {"pass"}
    assert {line["mode"] for line in lines[: len(responses)]} == {"shadow"}
    assert metric_value(metrics, "guard_decoys_served_total") == 0
    assert metric_value(metrics, "guard_actions_total", action="block", mode="shadow") > 0
    assert seen.status_code == 200
    assert seen.json()["choices"][0]["message"] == truth.json()["choices"][0]["message"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
