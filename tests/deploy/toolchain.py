"""Find the deploy tools (kubectl, hadolint, promtool), render kustomizations, read the result."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod"]
INSTALL_HINT = "run scripts/install-deploy-tools.sh"


def missing(reason: str) -> None:
    """Skip for a missing tool on a developer's machine; fail in CI, which installs them all."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: {INSTALL_HINT})")
    pytest.skip(f"{reason}: {INSTALL_HINT}")


def find_tool(name: str) -> str:
    """The path of ``name``: the virtual environment's copy first, then PATH."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed")
    return str(found)


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output as text; never raises on a non-zero exit."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def render(kustomization: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders for ``deploy/<kustomization>``."""
    result = run([find_tool("kubectl"), "kustomize", str(DEPLOY / kustomization)])
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` whose name is ``name`` or starts with ``name-`` (hashed)."""
    matches = [
        obj
        for obj in objects
        if obj["kind"] == kind
        and (obj["metadata"]["name"] == name or obj["metadata"]["name"].startswith(name + "-"))
    ]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def config_files(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The files of the guard's /etc/guard: the guard-config ConfigMap and guard-clients Secret."""
    files = dict(find(objects, "ConfigMap", "guard-config")["data"])
    secret = find(objects, "Secret", "guard-clients")
    files.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    files.update(secret.get("stringData", {}))
    return files
