"""The harness: real guards, vLLM and Redis as child processes on loopback, and guard configs.

What the test suite, the simulators in ``load_tests/`` and the benchmarks start what they
measure with (in the spirit of aiohttp's ``test_utils``)::

    from guard_server.testing import GuardProcess, write_config

    with GuardProcess(write_config(tmp, ["http://127.0.0.1:8000"]), tmp / "guard.log") as guard:
        ...  # guard.base_url for the SDK, guard.metrics(), guard.log()

Importing it starts nothing and imports neither torch nor vLLM; the server never imports it.
The pytest fixtures are in :mod:`guard_server.testing.pytest_plugin`.
"""

from guard_server.testing.child import REPO, ChildProcess, child_setup, free_port
from guard_server.testing.config import (
    ALICE_KEY,
    BOB_KEY,
    DEFAULT_POLICY,
    DEMO_KEY,
    POLICIES,
    TEST_CLIENTS,
    TEST_POLICIES,
    TRUSTED_KEY,
    model_dir_under_test,
    write_config,
    write_test_config,
)
from guard_server.testing.guard import GuardProcess, metric_value
from guard_server.testing.services import RedisProcess, running_vllm, serving_vllm, vllm_process

__all__ = [
    "ALICE_KEY",
    "BOB_KEY",
    "DEFAULT_POLICY",
    "DEMO_KEY",
    "POLICIES",
    "REPO",
    "TEST_CLIENTS",
    "TEST_POLICIES",
    "TRUSTED_KEY",
    "ChildProcess",
    "GuardProcess",
    "RedisProcess",
    "child_setup",
    "free_port",
    "metric_value",
    "model_dir_under_test",
    "running_vllm",
    "serving_vllm",
    "vllm_process",
    "write_config",
    "write_test_config",
]
