"""`guard-server trace`: attribution from watermark keys, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from guard_server.config.loader import load_settings
from guard_server.defences.hashing import is_green
from guard_server.defences.keys import watermark_key
from guard_server.testing import POLICIES, REPO, TEST_CLIENTS
from guard_server.trace import trace

SECRET = "s" * 40


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "guard.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "secret": {"env": "GUARD_TRACE_SECRET"},
                "policies": [str(POLICIES / "default.yaml"), str(POLICIES / "demo-clients.yaml"),
                             str(TEST_CLIENTS)],
            }
        )
    )  # fmt: skip
    return path


def _watermarked(key: int, length: int, vocab: int, rng: random.Random) -> list[int]:
    """A sequence that always picks a green token (what a strongly watermarked model emits)."""
    tokens = [rng.randrange(vocab)]
    candidates = np.arange(vocab, dtype=np.int64)
    for _ in range(length):
        green = candidates[is_green(key, np.int64(tokens[-1]), candidates, 0.25).astype(bool)]
        tokens.append(int(rng.choice(list(green))))
    return tokens


def test_trace_names_the_client_whose_key_explains_the_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_TRACE_SECRET", SECRET)
    settings = load_settings(_config(tmp_path))
    rng = random.Random(0)
    sequences = [
        _watermarked(watermark_key(settings.secret, "alice"), 60, 500, rng) for _ in range(4)
    ]
    verdict = trace(settings, sequences, gamma=0.25, alpha=1e-6)
    assert verdict.named == "alice"
    others = [item for item in verdict.scores if item.client != "alice"]
    assert all(abs(item.score.z) < 4 for item in others)
    plain = [[rng.randrange(500) for _ in range(61)] for _ in range(4)]
    assert trace(settings, plain, gamma=0.25, alpha=1e-6).named is None


def _run_trace(
    tmp_path: Path, generations: str | None, *extra: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gen.jsonl"
    if generations is not None:
        path.write_text(generations)
    return subprocess.run(
        [sys.executable, "-m", "guard_server", "trace", str(path), "--config",
         str(_config(tmp_path)), *extra],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "GUARD_TRACE_SECRET": SECRET},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("", "no generations found"),
        ("{not json\n", "gen.jsonl:1: not JSON"),
        ('{"text": "ok"}\n{"txt": "x"}\n', 'gen.jsonl:2: expected an object with a string "text"'),
        ('["a list"]\n', "gen.jsonl:1: expected an object"),
    ],
)
def test_bad_input_files_exit_2_with_a_clear_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    result = _run_trace(tmp_path, content)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_options_and_missing_secret(tmp_path: Path) -> None:
    assert "between 0 and 1" in _run_trace(tmp_path, '{"text": "a"}\n', "--gamma", "2").stderr
    no_secret = tmp_path / "plain.yaml"
    no_secret.write_text(
        yaml.safe_dump(
            {"policies": [str(POLICIES / "demo-clients.yaml"), str(POLICIES / "default.yaml")]}
        )
    )
    (tmp_path / "g.jsonl").write_text('{"text": "What is 1 + 2?"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "guard_server", "trace", str(tmp_path / "g.jsonl"), "--config",
         str(no_secret)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2 and "needs the server secret" in result.stderr


def test_cli_prints_every_client_as_json(tmp_path: Path) -> None:
    result = _run_trace(tmp_path, '{"text": "The answer is 42."}\n', "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["named"] is None
    assert {item["client"] for item in report["clients"]} == {
        "demo",
        "demo-trusted",
        "alice",
        "bob",
    }
