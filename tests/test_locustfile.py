"""The Locust file drives a real guard: honest and attacker classes send their simulators'
requests, answers are checked, refusals are counted apart from failures. Locust runs in its
own process and venv (scripts/install-locust.sh), never inside the test process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from guard_server.testing import ALICE_KEY, BOB_KEY, REPO, GuardProcess, write_test_config

LOCUST = REPO / ".locust-venv" / "bin" / "locust"


@pytest.mark.skipif(not LOCUST.exists(), reason="no .locust-venv (scripts/install-locust.sh)")
def test_locust_replays_honest_and_attacker_traffic(tmp_path: Path, vllm_url: str) -> None:
    config = write_test_config(tmp_path, [vllm_url])
    with GuardProcess(config, tmp_path / "guard.log") as guard:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "GUARD_LOCUST_HONEST_KEYS": ALICE_KEY,
            "GUARD_LOCUST_ATTACKER_KEYS": BOB_KEY,
            "GUARD_LOCUST_SPEEDUP": "600",
        }
        result = subprocess.run(
            [
                str(LOCUST), "-f", "load_tests/locustfile.py", "--host", guard.url,
                "--headless", "-u", "4", "-r", "4", "-t", "8s", "--only-summary",
                "--csv", str(tmp_path / "run"), "--exit-code-on-error", "0",
                "HonestUserLoad", "BulkExtractorLoad",
                "--config-users", json.dumps([
                    {"user_class_name": "HonestUserLoad", "fixed_count": 3},
                    {"user_class_name": "BulkExtractorLoad", "fixed_count": 1},
                ]),
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    sent = {name: int(row["Request Count"]) for name, row in rows.items() if name != "Aggregated"}
    assert sum(n for name, n in sent.items() if name.startswith("BulkExtractorLoad")) > 0, sent
    assert sum(n for name, n in sent.items() if name.startswith("HonestUserLoad")) > 0, sent
    assert int(rows["Aggregated"]["Failure Count"]) == 0, rows["Aggregated"]
