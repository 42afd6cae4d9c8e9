"""Session fixtures: the harness's (guard_server.testing.pytest_plugin), and the storyteller."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guard_server.testing import serving_vllm

pytest_plugins = ("guard_server.testing.pytest_plugin",)


@pytest.fixture(scope="session")
def storyteller_url(artifacts: Path) -> Iterator[str]:
    """Real vLLM serving the lab's storyteller, started by the first test that needs it.

    Set GUARD_TEST_STORYTELLER_URL to reuse a vLLM you already run.
    """
    from load_tests.lab.train_storyteller import STORYTELLER_DIR

    log = artifacts / "storyteller.log"
    with serving_vllm(STORYTELLER_DIR, log, "GUARD_TEST_STORYTELLER_URL") as url:
        yield url
