"""Guard configs for tests, simulators and benchmarks, and the repository's demo and test keys."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from guard_server.teacher import MODEL_DIR, SERVED_MODEL_NAME
from guard_server.testing.child import REPO, free_port

POLICIES = REPO / "policies"
"""The repository's policy presets."""
DEFAULT_POLICY = POLICIES / "default.yaml"
"""The shipped tiers (``default``, ``trusted``)."""
TEST_CLIENTS = REPO / "tests" / "data" / "test-clients.yaml"
"""The test suite's extra clients (alice, bob)."""
TEST_POLICIES = (DEFAULT_POLICY, POLICIES / "demo-clients.yaml", TEST_CLIENTS)
"""What the suite's guards load: the shipped tiers, the demo clients and the test clients."""

DEMO_KEY = "sk-guard-demo"
"""The demo client's key (default tier, policies/demo-clients.yaml)."""
TRUSTED_KEY = "sk-guard-trusted"
"""The trusted demo client's key (trusted tier, policies/demo-clients.yaml)."""
ALICE_KEY = "sk-test-alice"
"""A test client's key (tests/data/test-clients.yaml)."""
BOB_KEY = "sk-test-bob"
"""Another test client's key (tests/data/test-clients.yaml)."""


def model_dir_under_test() -> Path:
    """The model the suite serves: ``GUARD_TEST_MODEL_DIR``, or the bundled teacher."""
    return Path(os.environ.get("GUARD_TEST_MODEL_DIR", str(MODEL_DIR)))


def write_config(
    directory: Path,
    upstream_urls: Sequence[str],
    *,
    policies: Sequence[Path | str] = (DEFAULT_POLICY, POLICIES / "demo-clients.yaml"),
    model: str = SERVED_MODEL_NAME,
    upstream: dict[str, Any] | None = None,
    name: str = "guard.yaml",
    **sections: Any,
) -> Path:
    """Write ``directory/name``: a guard on 127.0.0.1 in front of ``upstream_urls`` serving
    ``model`` (plus the ``upstream`` settings), with ``policies``; return its path. With no
    URLs there is no ``upstreams`` section: ``serve`` runs the managed model itself.

    Each of ``sections`` is a top-level section of the config: a mapping extends (and
    overrides keys of) the section there is, anything else replaces it.
    """
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "metrics": {"port": free_port()},  # its own port; the default 9464 would collide
    }
    if upstream_urls:
        config["upstreams"] = {model: {"urls": list(upstream_urls), **(upstream or {})}}
    config["policies"] = [str(p) for p in policies]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_test_config(directory: Path, upstream_urls: Sequence[str], **overrides: Any) -> Path:
    """:func:`write_config` as the suite wants it: :data:`TEST_POLICIES`, config reloads every
    0.2 s, upstream health probes every 0.5 s, short timeouts. ``overrides`` (``policies``
    among them) work as :func:`write_config`'s sections."""
    server = {"reload_interval_s": 0.2, **overrides.pop("server", {})}
    return write_config(
        directory,
        upstream_urls,
        policies=overrides.pop("policies", TEST_POLICIES),
        upstream={"timeouts": {"connect": 2, "read": 30, "total": 120}, "health_interval_s": 0.5},
        server=server,
        **overrides,
    )
