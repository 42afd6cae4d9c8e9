"""One guard in front of the session's real vLLM for the red-team tests: the shipped tiers,
plus clients and tiers that put one closed hole each within reach."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import POLICIES, GuardProcess, write_test_config

ADMIN_KEY = "sk-rt-admin"
KEYS = {
    "rt-default": "sk-rt-default",  # the shipped default tier
    "rt-quiet": "sk-rt-quiet",  # the default tier without detection: its plan never moves
    "rt-limited": "sk-rt-limited",  # default tier, 6 requests a minute
    "rt-batcher": "sk-rt-batcher",  # default tier, its profile read through the admin API
    "rt-lp": "sk-rt-lp",  # rt-quiet that also allows prompt_logprobs
    "rt-allow": "sk-rt-allow",  # rt-quiet that opts in to logprobs under constraints
    "rt-bare": "sk-rt-bare",  # a tier that sets only its fields (and detection off)
}
BODY_TIMEOUT_S = 2.0


def _tiers() -> dict[str, Any]:
    default = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]["default"]
    quiet = {**default, "detection": {"enabled": False}}
    lp = {**quiet, "allow_fields": [*default["allow_fields"], "prompt_logprobs"]}
    allow = {**quiet, "logprobs": {**default["logprobs"], "with_constraints": "allow"}}
    bare = {
        "allow_fields": ["@openai", "@vllm_sampling", "echo", "prompt_logprobs"],
        "detection": {"enabled": False},
    }
    return {"rt-lp": lp, "rt-allow": allow, "rt-bare": bare, "rt-quiet": quiet}


@pytest.fixture(scope="package")
def rt_guard(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardProcess]:
    """The red-team guard, with the admin API and an audit log."""
    directory = tmp_path_factory.mktemp("redteam")
    clients: dict[str, Any] = {
        name: {"tier": name if name in _tiers() else "default", "keys": [hash_key(key)]}
        for name, key in KEYS.items()
    }
    clients["rt-limited"]["limits"] = {"requests_per_minute": 6}
    policy = directory / "redteam.yaml"
    policy.write_text(yaml.safe_dump({"tiers": _tiers(), "clients": clients}))
    config = write_test_config(
        directory,
        [vllm_url],
        server={"host": "127.0.0.1", "port": 0, "body_timeout_s": BODY_TIMEOUT_S},
        policies=[
            str(POLICIES / "default.yaml"),
            str(POLICIES / "demo-clients.yaml"),
            str(policy),
        ],
        admin={"key_hash": hash_key(ADMIN_KEY)},
        audit={"path": str(directory / "audit.jsonl")},
    )
    guard = GuardProcess(config, directory / "guard.log").start()
    guard.wait_ready()
    try:
        yield guard
    finally:
        guard.stop()


def sdk(guard: GuardProcess, client: str) -> openai.OpenAI:
    """The official SDK as one of the red-team clients (``KEYS``) or a demo key."""
    key = KEYS.get(client, client)
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


def post(guard: GuardProcess, client: str, path: str, body: dict[str, Any]) -> httpx.Response:
    """A raw JSON request, for bodies the SDK would not send."""
    headers = {"Authorization": f"Bearer {KEYS.get(client, client)}"}
    return httpx.post(f"{guard.base_url}{path}", json=body, headers=headers, timeout=60)


def profile(guard: GuardProcess, client: str) -> dict[str, Any]:
    """The client's profile, read through the admin API."""
    response = httpx.get(
        f"{guard.url}/admin/clients/{client}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def upstream_calls(guard: GuardProcess) -> float:
    """How many requests this guard has sent to vLLM (its upstream-latency histogram count)."""
    from guard_server.testing import metric_value

    return metric_value(guard.metrics(), "guard_upstream_duration_seconds_count")
