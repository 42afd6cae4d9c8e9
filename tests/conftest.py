"""Session fixtures: real vLLM on the bundled teacher (and the storyteller), a guard in front."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from guard_server.upstream.bundled_teacher import TEACHER_DIR
from guard_server.upstream.vllm_process import VllmProcess
from tests.processes import DEMO_KEY, TRUSTED_KEY, GuardProcess, RedisProcess, write_config


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for logs and configs of this test session."""
    return tmp_path_factory.mktemp("session")


def _serve(model_dir: str | Path, reuse_env: str, log_path: Path) -> Iterator[str]:
    """The URL of a running vLLM: the one ``reuse_env`` names, or one started on ``model_dir``."""
    external = os.environ.get(reuse_env)
    if external:
        yield external.rstrip("/")
        return
    process = VllmProcess(model_dir, "teacher", log_path=log_path)
    process.start()
    try:
        process.wait_healthy(timeout_s=300)
        yield process.url
    finally:
        process.stop()


@pytest.fixture(scope="session")
def vllm_url(artifacts: Path) -> Iterator[str]:
    """Real vLLM (CPU) serving the bundled teacher, started once per session.

    Set GUARD_TEST_VLLM_URL to reuse a vLLM you already run.
    """
    model_dir = os.environ.get("GUARD_TEST_MODEL_DIR", str(TEACHER_DIR))
    yield from _serve(model_dir, "GUARD_TEST_VLLM_URL", artifacts / "vllm.log")


@pytest.fixture(scope="session")
def storyteller_url(artifacts: Path) -> Iterator[str]:
    """Real vLLM serving the lab's storyteller, started by the first test that needs it.

    Set GUARD_TEST_STORYTELLER_URL to reuse a vLLM you already run.
    """
    from load_tests.lab.train_storyteller import STORYTELLER_DIR

    yield from _serve(STORYTELLER_DIR, "GUARD_TEST_STORYTELLER_URL", artifacts / "storyteller.log")


@pytest.fixture(scope="session")
def guard(vllm_url: str, artifacts: Path) -> Iterator[GuardProcess]:
    """One guard process in front of the session's vLLM, with the repo's policies."""
    directory = artifacts / "guard"
    directory.mkdir()
    process = GuardProcess(write_config(directory, [vllm_url]), artifacts / "guard.log")
    process.start()
    process.wait_ready()
    try:
        yield process
    finally:
        process.stop()


def _client(guard: GuardProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(guard: GuardProcess) -> openai.OpenAI:
    """The official SDK, as a default-tier client."""
    return _client(guard, DEMO_KEY)


@pytest.fixture
def trusted_client(guard: GuardProcess) -> openai.OpenAI:
    """The official SDK, as a trusted-tier client."""
    return _client(guard, TRUSTED_KEY)


@pytest.fixture
async def async_client(guard: GuardProcess):
    """The official async SDK, as a default-tier client."""
    client = openai.AsyncOpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A real redis-server on loopback for the whole session."""
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.stop()
