"""``guard-server replay`` on an audit log recorded by a real guard in front of real vLLM,
with the openai SDK as the client: under the policy it ran with, the replay finds what the
guard decided; under another, it reports what would change, per client and end user."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import openai
import pytest
import yaml

from guard_server.cli import main
from guard_server.pipeline.auth import hash_key
from guard_server.teacher.task import make_problems
from guard_server.testing import POLICIES, GuardProcess, write_test_config

ATTACKER_KEY = "sk-test-replay-attacker"
APP_KEY = "sk-test-replay-app"
# Fewer than 20 requests per scope, so timing never scores: the run is deterministic.
THRESHOLDS = {"tighten": 0.03, "perturb": 0.08, "decoy": 0.12, "block": 0.165}
PROBLEMS = make_problems(40, seed=43, split="heldout")


def _policy(path: Path, thresholds: dict[str, float], evidence_min: float) -> Path:
    """``watched``: the shipped ``application`` tier (end users scored) at ``thresholds``."""
    application = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]["application"]
    detection = {**application["detection"], "thresholds": thresholds, "evidence_min": evidence_min}
    tier = {**application, "detection": detection}
    policy = {
        "tiers": {"watched": tier},
        "clients": {
            "attacker": {"tier": "watched", "keys": [hash_key(ATTACKER_KEY)]},
            "app": {"tier": "watched", "keys": [hash_key(APP_KEY)]},
        },
    }
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, vllm_url: str) -> tuple[Path, Path]:
    """A short run through a real guard: (its audit log, the policy file it ran with)."""
    tmp_path = tmp_path_factory.mktemp("replay")
    policy = _policy(tmp_path / "watched.yaml", THRESHOLDS, 0.0)
    config = write_test_config(
        tmp_path,
        [vllm_url],
        policies=[str(POLICIES / "default.yaml"), str(policy)],
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    refused: list[tuple[str, str]] = []
    with GuardProcess(config, tmp_path / "guard.log") as guard:
        attacker = openai.OpenAI(base_url=guard.base_url, api_key=ATTACKER_KEY, max_retries=0)
        app = openai.OpenAI(base_url=guard.base_url, api_key=APP_KEY, max_retries=0)
        for i in range(16):
            question = [{"role": "user", "content": PROBLEMS[i].question}]
            logprobs = {"logprobs": True, "top_logprobs": 5} if i >= 6 else {}
            try:
                attacker.chat.completions.create(
                    model="teacher", messages=question, max_tokens=8, **logprobs
                )
            except openai.PermissionDeniedError as exc:  # blocked: still one audit line
                refused.append(("attacker", exc.message))
            # The app: two honest end users, and mallory asking with maximal logprobs.
            end_user = ("alice", "bob", "mallory")[i % 3]
            extra = {"logprobs": True, "top_logprobs": 5} if end_user == "mallory" else {}
            question = [{"role": "user", "content": PROBLEMS[20 + i].question}]
            try:
                app.chat.completions.create(
                    model="teacher",
                    messages=question,
                    max_tokens=8,
                    safety_identifier=end_user,
                    **extra,
                )
            except openai.PermissionDeniedError as exc:
                refused.append((end_user, exc.message))
    time.sleep(0.2)
    # mallory's own scope blocks her from her first request (maximal logprobs, thresholds
    # this low); the app's key and its other end users are not blocked.
    assert {who for who, _ in refused} == {"attacker", "mallory"}
    assert all("this end user are suspended" in why for who, why in refused if who == "mallory")
    assert all("This API key is suspended" in why for who, why in refused if who == "attacker")
    return tmp_path / "audit.jsonl", policy


def _replay(audit: Path, policy: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    argv = ["replay", str(audit), "--policy", str(POLICIES / "default.yaml")]
    assert main([*argv, "--policy", str(policy), "--out", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_replay_under_the_recorded_policy_finds_what_the_guard_decided(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit, policy = recorded
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 32 and all("features" in line for line in lines)
    assert {line.get("end_user") for line in lines} == {None, "alice", "bob", "mallory"}
    assert any(line.get("scope", "").endswith(tuple("0123456789abcdef")) for line in lines)
    report = _replay(audit, policy, tmp_path, capsys)
    assert report["requests"] == 32 and report["skipped_without_features"] == 0
    assert report["changed"] == 0, report["transitions"]
    attacker = next(c for c in report["clients"] if c["client"] == "attacker")
    assert set(attacker["after"]) == {"pass", "tighten", "perturb", "decoy", "block"}


def test_replay_under_another_policy_reports_what_changes(
    recorded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit, _ = recorded
    shipped = {"tighten": 0.35, "perturb": 0.4, "decoy": 0.45, "block": 0.95}
    report = _replay(audit, _policy(tmp_path / "shipped.yaml", shipped, 0.375), tmp_path, capsys)
    assert report["changed"] > 10
    assert report["transitions"].get("block -> pass", 0) > 0
    attacker = next(c for c in report["clients"] if c["client"] == "attacker")
    assert attacker["changed"] and set(attacker["after"]) <= {"pass", "tighten"}
    mallory = next(u for u in report["end_users"] if u["end_user"] == "mallory")
    assert mallory["client"] == "app" and mallory["changed"] > 0
    assert mallory["requests"] == sum(mallory["before"].values())
    rows = (tmp_path / "risk.csv").read_text().splitlines()
    assert len(rows) == 33 and rows[0].startswith("ts,client,end_user,risk_before,risk_after")
    svg = ET.parse(tmp_path / "risk.svg").getroot()
    texts = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "attacker" in texts and "app" in texts
    assert {"tighten 0.35", "decoy 0.45", "block 0.95"} <= set(texts)  # the replayed policy's
    lines = svg.iter("{http://www.w3.org/2000/svg}polyline")
    assert sum(1 for _ in lines) == 2 * (2 + 4)  # per client: before, after, 4 thresholds
