"""vLLM on SmolLM2 (with the guard's plugin) and a guard in front, with the lab's tiers.

Tiers: the repo's ``trusted`` and ``default`` (``policies/default.yaml``) and, built on
``default``, one tier per plugin setting under test: sampling noise at several sigmas and the
watermark at several deltas. Detection is off everywhere (its actions would add their own
noise and decoys: what is measured is the policy itself). The secret is fixed, so every
figure repeats. Clients: one per tier, a ``clean`` client (the default tier), the
``attacker`` (watermark at the policy default, delta 2) and 22 bystander keys that never send
anything, so a trace always tests at least 24 keys.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import DEFAULT_POLICY, GuardProcess, running_vllm, write_config
from guard_server.upstream import smollm2
from guard_server.upstream.bundled_teacher import managed_vllm

MODEL = "smollm2"
SECRET_ENV = "GUARD_REALMODEL_SECRET"
SECRET = "real-model-lab-fixed-secret-0123456789abcdef"
SIGMAS = (0.25, 0.5, 1.0, 2.0)
DELTAS = (1.0, 2.0, 4.0)
GAMMA = 0.25
BYSTANDERS = 22
STARTUP_TIMEOUT_S = 900.0


def _tiers() -> dict[str, dict[str, Any]]:
    repo = yaml.safe_load(DEFAULT_POLICY.read_text())["tiers"]
    off = {"enabled": False}
    tiers = {name: {**policy, "detection": off} for name, policy in repo.items()}
    base = tiers["default"]
    for sigma in SIGMAS:
        tiers[f"noise{sigma:g}"] = {**base, "sampling": {"noise": {"sigma": sigma}}}
    for delta in DELTAS:
        mark = {"enabled": True, "gamma": GAMMA, "delta": delta}
        tiers[f"wm{delta:g}"] = {**base, "sampling": {"watermark": mark}}
    return tiers


def clients() -> dict[str, tuple[str, str]]:
    """Client id -> (tier, API key)."""
    out = {name: (name, f"sk-lab-{name}") for name in _tiers()}
    out["clean"] = ("default", "sk-lab-clean")
    out["attacker"] = ("wm2", "sk-lab-attacker")
    out.update({f"other{i:02d}": ("wm2", f"sk-lab-other-{i:02d}") for i in range(BYSTANDERS)})
    return out


def key(client: str) -> str:
    """The API key of ``client``."""
    return clients()[client][1]


def write_lab_config(directory: Path, vllm_url: str | None, vllm_port: int = 0) -> Path:
    """The guard's config and policy file for the lab, in ``directory``.

    With ``vllm_url`` None there is no upstream: ``serve --teacher smollm2`` then runs vLLM
    itself (on ``vllm_port``, 0 = any).
    """
    policy = {
        "tiers": _tiers(),
        "clients": {
            cid: {"tier": tier, "keys": [hash_key(api_key)]}
            for cid, (tier, api_key) in clients().items()
        },
    }
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy))
    sections: dict[str, Any] = {"secret": {"env": SECRET_ENV}}
    if vllm_url is None:
        # A first start compiles the model: minutes on a busy 2-core machine.
        sections["bundled_teacher"] = {
            "model": "smollm2",
            "port": vllm_port,
            "startup_timeout_s": STARTUP_TIMEOUT_S,
        }
    timeouts = {"connect": 2, "read": 300, "total": 900}
    return write_config(
        directory,
        [vllm_url] if vllm_url else [],
        model=MODEL,
        policies=[directory / "policy.yaml"],
        upstream={"guard_plugin": True, "timeouts": timeouts},
        **sections,
    )


@dataclass(frozen=True, slots=True)
class Lab:
    """A running guard (and the vLLM behind it)."""

    guard: GuardProcess
    config: Path
    vllm_url: str

    @property
    def base_url(self) -> str:
        return self.guard.base_url


@contextlib.contextmanager
def secret_in_env() -> Iterator[None]:
    """The lab's fixed secret in the environment (for the guard, and for ``trace``)."""
    previous = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = SECRET
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = previous


@contextlib.contextmanager
def running_lab(
    workdir: Path, vllm_url: str | None = None, dtype: str | None = None
) -> Iterator[Lab]:
    """Start vLLM on SmolLM2 (unless ``vllm_url``: one with the plugin) and the lab's guard."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(secret_in_env())
        if vllm_url is None:
            smollm2.ensure_model()
            vllm = managed_vllm("smollm2", MODEL, log_path=workdir / "vllm.log", dtype=dtype)
            stack.enter_context(running_vllm(vllm, timeout_s=900))
            vllm_url = vllm.url
        config = write_lab_config(workdir, vllm_url)
        guard = stack.enter_context(GuardProcess(config, workdir / "guard.log"))
        yield Lab(guard, config, vllm_url.rstrip("/"))
