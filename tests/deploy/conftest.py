"""Fixtures of the deploy checks: every kustomization rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.toolchain import KUSTOMIZATIONS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """The rendered objects of deploy/base and of each overlay, by kustomization path."""
    return {name: render(name) for name in KUSTOMIZATIONS}
