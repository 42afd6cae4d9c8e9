"""The guard config each kustomization and image deploys passes `guard-server check-config`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.toolchain import KUSTOMIZATIONS, REPO, config_files, run

# The real secrets are created in the cluster, never committed: any valid ones will do.
SECRET_ENV = {
    **os.environ,
    "GUARD_SECRET": "x" * 48,
    "VLLM_API_KEY": "vllm-key-for-check-config",
    "REDIS_PASSWORD": "redis-password-for-check-config",
}


def _check_config(directory: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for name, text in files.items():
        (directory / name).write_text(text)
    command = [sys.executable, "-m", "guard_server", "check-config", str(directory / "guard.yaml")]
    return run(command, env=SECRET_ENV, cwd=REPO)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_deployed_config_passes_check_config(
    rendered: dict[str, list[dict[str, Any]]], kustomization: str, tmp_path: Path
) -> None:
    # exactly the files of the pod's /etc/guard: the ConfigMap's and the clients Secret's
    result = _check_config(tmp_path, config_files(rendered[kustomization]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: "), result.stdout


def test_check_config_rejects_a_broken_deployed_config(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    files = config_files(rendered["overlays/prod"])
    files["tiers.yaml"] = files["tiers.yaml"].replace("max_top: 20", "max_top: -1")
    result = _check_config(tmp_path, files)
    assert result.returncode == 2
    assert "max_top" in result.stderr


def test_demo_image_config_passes_check_config(tmp_path: Path) -> None:
    # the demo image's /etc/guard: deploy/docker/demo/ and two policy files (see Dockerfile)
    sources = [
        "deploy/docker/demo/guard.yaml",
        "policies/default.yaml",
        "policies/demo-clients.yaml",
    ]
    files = {Path(source).name: (REPO / source).read_text() for source in sources}
    result = _check_config(tmp_path, files)
    assert result.returncode == 0, result.stderr
