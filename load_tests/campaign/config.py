"""The campaign's settings, populations, keys and the guard config and policy of a phase."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from guard_server.config.schema import TierPolicy
from guard_server.detection.scoring import ACTIONS
from guard_server.pipeline.auth import hash_key
from guard_server.testing import (
    DEFAULT_POLICY,
    write_config,
)
from load_tests.simulators import Simulator, attackers, honest_population

ADMIN_KEY = "sk-campaign-admin"
PORTS = range(8600, 8700)
"""The ports set aside for the campaign's vLLM and guards."""
NOMINAL_LIMITS = {"requests_per_minute": 60, "tokens_per_minute": 20_000}
"""The static per-client limits of the campaign tier, in simulated time (scaled by the
compression factor in the generated policy, since the guard's clock is real time)."""

PHASES = ("defended", "undefended")
"""``defended``: the default tier's policy (detection on); ``undefended``: the same tier with
detection disabled. Both have the same static limits."""
APPLICATION_TIER = "application"
"""The shipped tier for applications that name their end users (per-end-user scoring on):
the one the chat application of ``load_tests.campaign.endusers`` is scored on."""


@dataclass(frozen=True, slots=True)
class CampaignConfig:
    """The simulated populations, the timeline and the student's training budget."""

    budget: int = 4000  # queries per attacker (the hydra's over all its keys)
    honest: int = 200
    batch: int = 3
    hydra_keys: int = 60
    window_h: float = 4.0  # simulated duration of the campaign
    compression: float = 15.0  # simulated seconds per real second
    grace: float = 0.5  # extra share of the window a throttled sender may take
    seed: int = 0
    honest_requests: float = 25.0  # mean requests per interactive user over the window
    suite_size: int = 400  # mean size of a batch user's regression suite
    suite_runs: int = 3
    student_steps: int | None = None  # None: the lab's StudentConfig
    student_batch: int | None = None
    eval_n: int = 500
    kinds: tuple[str, ...] = ("bulk", "low_and_slow", "hydra", "mimic", "batch_bulk")
    thresholds: tuple[float, ...] | None = None  # tighten, perturb, decoy, block (policy override)

    @property
    def window_s(self) -> float:
        """The simulated window in seconds."""
        return self.window_h * 3600.0

    @property
    def deadline_real_s(self) -> float:
        """Real seconds after which no new request is sent."""
        return self.window_s * (1.0 + self.grace) / self.compression


QUICK = CampaignConfig(
    budget=2000,
    honest=50,
    batch=1,
    hydra_keys=50,
    window_h=1.0,
    compression=15.0,
    honest_requests=12.0,
    suite_size=200,
    suite_runs=2,
    eval_n=300,
)


def population(cfg: CampaignConfig, model: str = "teacher") -> list[Simulator]:
    """The honest users, batch jobs and attackers of a campaign."""
    sims: list[Simulator] = honest_population(
        cfg.honest,
        cfg.batch,
        cfg.seed,
        cfg.window_s,
        model,
        mean_requests=cfg.honest_requests,
        suite_size=cfg.suite_size,
        suite_runs=cfg.suite_runs,
    )
    for attacker in attackers(cfg.seed, cfg.budget, cfg.window_s, model, cfg.hydra_keys):
        if attacker.kind not in cfg.kinds:
            continue
        if attacker.rate_per_min() >= NOMINAL_LIMITS["requests_per_minute"]:
            raise ValueError(f"{attacker.name} would exceed the static limit; lower --budget")
        sims.append(attacker)
    return sims


def api_key(client: str) -> str:
    """The (test-only, deterministic) API key of a simulated client."""
    return f"sk-campaign-{client}"


def campaign_tier(
    detection: bool,
    compression: float,
    thresholds: tuple[float, ...] | None = None,
    policy_file: Path = DEFAULT_POLICY,
    base: str = "default",
) -> dict[str, Any]:
    """The ``base`` tier of ``policy_file`` with the campaign's static limits.

    ``thresholds`` (tighten, perturb, decoy, block) override the tier's action thresholds.
    """
    tier = dict(yaml.safe_load(policy_file.read_text())["tiers"][base])
    tier["limits"] = {name: round(v * compression) for name, v in NOMINAL_LIMITS.items()}
    settings = dict(tier.get("detection", {}))
    if thresholds is not None:
        settings["thresholds"] = dict(zip(ACTIONS[1:], thresholds, strict=True))
    if not detection:
        settings["enabled"] = False
    tier["detection"] = settings
    return tier


def write_guard_config(
    directory: Path,
    vllm_url: str,
    clients: list[str],
    phase: str,
    cfg: CampaignConfig,
    policy_file: Path = DEFAULT_POLICY,
) -> Path:
    """A guard config + policy for one phase: all clients on one tier (``policy_file``'s
    default tier), admin API and audit on."""
    directory = directory.resolve()  # the guard resolves relative paths from the config's folder
    directory.mkdir(parents=True, exist_ok=True)
    policy = {
        "tiers": {
            phase: campaign_tier(phase == "defended", cfg.compression, cfg.thresholds, policy_file)
        },
        "clients": {c: {"tier": phase, "keys": [hash_key(api_key(c))]} for c in clients},
    }
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    secret = directory / "secret"
    secret.write_text(secrets.token_hex(32))
    return write_config(
        directory,
        [vllm_url],
        policies=[directory / "policy.yaml"],
        upstream={"timeouts": {"connect": 5, "read": 60, "total": 120}, "max_connections": 512},
        server={"reload_interval_s": 5},
        secret={"file": str(secret)},
        admin={"key_hash": hash_key(ADMIN_KEY)},
        audit={"path": str(directory / "audit.jsonl"), "max_bytes": 2_000_000_000},
    )


def defended_tier(override: tuple[float, ...] | None = None, base: str = "default") -> TierPolicy:
    """The defended phase's tier, validated (with the thresholds ``override`` if given);
    ``base``: the shipped tier it starts from (:data:`APPLICATION_TIER` for an application
    that names its end users)."""
    return TierPolicy.model_validate(campaign_tier(True, 1.0, override, base=base))


def campaign_thresholds(override: tuple[float, ...] | None = None) -> dict[str, float]:
    """The campaign tier's action thresholds (the default tier's, or ``override``)."""
    return defended_tier(override).detection.thresholds.model_dump()
