"""pytest fixtures on the harness: real vLLM, a guard in front of it, SDK clients, Redis.

Load it with ``pytest_plugins = ("guard_server.testing.pytest_plugin",)`` in a conftest.
Session fixtures start each service once; ``start_guard`` is a factory for guards of a test's
own config. Every process a fixture starts is stopped when the fixture ends.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from guard_server.state.base import StateStore
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.teacher import MODEL_DIR
from guard_server.testing.config import (
    DEMO_KEY,
    TRUSTED_KEY,
    model_dir_under_test,
    write_test_config,
)
from guard_server.testing.guard import GuardProcess
from guard_server.testing.services import RedisProcess, serving_vllm


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for logs and configs of this test session."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def vllm_url(artifacts: Path) -> Iterator[str]:
    """Real vLLM (CPU) serving the bundled teacher (or GUARD_TEST_MODEL_DIR), started once per
    session. Set GUARD_TEST_VLLM_URL to reuse a vLLM you already run."""
    with serving_vllm(model_dir_under_test(), artifacts / "vllm.log", "GUARD_TEST_VLLM_URL") as url:
        yield url


@pytest.fixture(scope="session")
def embedding_vllm_url(artifacts: Path) -> Iterator[str]:
    """Real vLLM (CPU) serving the bundled teacher converted to an embedding model
    (``teacher-embed``), started once per session by the first test that needs it. Set
    GUARD_TEST_EMBED_URL to reuse one you already run."""
    log = artifacts / "vllm-embed.log"
    with serving_vllm(MODEL_DIR, log, "GUARD_TEST_EMBED_URL", embeddings=True) as url:
        yield url


@pytest.fixture(scope="session")
def guard(vllm_url: str, artifacts: Path) -> Iterator[GuardProcess]:
    """One guard process in front of the session's vLLM, with the repo's policies."""
    directory = artifacts / "guard"
    directory.mkdir()
    with GuardProcess(write_test_config(directory, [vllm_url]), artifacts / "guard.log") as process:
        yield process


@pytest.fixture
def start_guard(tmp_path: Path) -> Iterator[Callable[..., GuardProcess]]:
    """A factory: ``start_guard(upstream_urls, **overrides)`` writes a suite config
    (``write_test_config``) in a folder of its own under ``tmp_path`` and returns the guard,
    started (``/healthz`` answers; ``wait_ready`` for ``/readyz``). Every guard it started is
    stopped after the test."""
    started: list[GuardProcess] = []

    def start(upstream_urls: Sequence[str], **overrides: Any) -> GuardProcess:
        directory = tmp_path / f"guard{len(started)}"
        directory.mkdir()
        config = write_test_config(directory, upstream_urls, **overrides)
        guard = GuardProcess(config, directory / "guard.log")
        started.append(guard)
        return guard.start()

    yield start
    for guard in started:
        guard.stop()


def _sdk(guard: GuardProcess, key: str, **options: Any) -> openai.OpenAI:
    """The official SDK pointed at ``guard`` with ``key``, without retries."""
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, **options)


@pytest.fixture
def client(guard: GuardProcess) -> openai.OpenAI:
    """The official SDK, as a default-tier client."""
    return _sdk(guard, DEMO_KEY, timeout=60)


@pytest.fixture
def trusted_client(guard: GuardProcess) -> openai.OpenAI:
    """The official SDK, as a trusted-tier client."""
    return _sdk(guard, TRUSTED_KEY, timeout=60)


@pytest.fixture
async def async_client(guard: GuardProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official async SDK, as a default-tier client."""
    client = openai.AsyncOpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A real redis-server on loopback for the whole session."""
    with RedisProcess() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """A state store of each backend: in memory, and on the session's Redis (own key prefix)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield redis_store
    await redis_store.close()
