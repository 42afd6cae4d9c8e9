"""Load the config file and its policy files into one validated, immutable snapshot."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from guard_server.config.schema import (
    SECRET_IN_CONFIG,
    Bound,
    ClientEntry,
    DetectionPolicy,
    EmbeddingsPolicy,
    GuardConfig,
    LogitBiasPolicy,
    LogprobPolicy,
    PolicyFile,
    SamplingPolicy,
    SecretSource,
    TierPolicy,
)
from guard_server.defences.logprobs import LogprobHardening
from guard_server.openai_fields import expand_field_selectors
from guard_server.otel import EXTRA_HINT
from guard_server.otel import missing_packages as otel_missing_packages
from guard_server.state.base import LimitSpec

MIN_SECRET_BYTES = 32
_CREDENTIAL = re.compile(rb"[\x21-\x7e]+")
# libyaml's safe loader when available: several times faster on large client files.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Model = TypeVar("_Model", bound=BaseModel)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file, field and value."""


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier, resolved: the models it may use, the fields it may send, and their bounds."""

    name: str
    models: frozenset[str] | None  # None: every configured model
    allowed_fields: frozenset[str]
    stripped_fields: frozenset[str]
    bounds: dict[str, Bound]
    max_prompts: int
    content_parts: frozenset[str]
    logprobs: LogprobPolicy
    hardening: LogprobHardening
    logit_bias: LogitBiasPolicy
    seed: str
    detection: DetectionPolicy
    sampling: SamplingPolicy
    embeddings: EmbeddingsPolicy

    def may_use(self, model: str) -> bool:
        """Whether this tier may call ``model``."""
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated API client."""

    id: str
    tier: Tier
    limits: LimitSpec
    detection_mode: str = "enforce"  # the client's override, else its tier's


@dataclass(frozen=True)
class Settings:
    """One consistent snapshot of everything the guard was configured with."""

    path: Path
    config: GuardConfig
    tiers: dict[str, Tier]
    clients_by_key_hash: dict[bytes, Client]
    secret: bytes = field(repr=False)
    secret_is_ephemeral: bool
    files: tuple[Path, ...]
    digest: str = field(compare=False)
    upstream_api_keys: dict[str, str] = field(default_factory=dict, repr=False)
    """The key each model's upstream expects (``upstreams.<model>.api_key``), read at load."""
    redis_password: str | None = field(default=None, repr=False)

    @cached_property
    def clients_by_id(self) -> dict[str, Client]:
        """Configured clients by id (built once per settings snapshot: the admin API and
        the metrics look clients up by id)."""
        return {client.id: client for client in self.clients_by_key_hash.values()}

    @property
    def model_names(self) -> list[str]:
        """Every configured model name (decoy models too), in configuration order."""
        if self.config.upstreams:
            return list(self.config.upstreams)
        return [self.config.bundled_teacher.public_name]

    @cached_property
    def decoy_models(self) -> frozenset[str]:
        """Models that answer decoyed requests (``detection.decoy.model``): never offered."""
        return frozenset(
            tier.detection.decoy.model
            for tier in self.tiers.values()
            if tier.detection.decoy.source == "model" and tier.detection.decoy.model
        )

    @cached_property
    def public_models(self) -> tuple[str, ...]:
        """The models clients may name: every configured one but the decoy models. A decoy
        model that could be listed or called would let a client compare it with decoys."""
        return tuple(name for name in self.model_names if name not in self.decoy_models)


def _read_yaml(path: Path, allow_empty: bool = True) -> tuple[Any, bytes]:
    """The file's top-level mapping and its bytes; ConfigError with the place of any problem.

    ``allow_empty=False`` refuses a file with no YAML document: a policy file caught between
    truncation and rewrite by the reload watcher reads empty, and must not drop every client.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(raw, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        if not allow_empty:
            raise ConfigError(f"{path}: the file is empty (a policy file needs tiers or clients)")
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data, raw


def _validate(model: type[_Model], data: dict[str, Any], path: Path) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {exc.error_count()} invalid field(s):"]
        for error in exc.errors(include_url=False):
            location = ".".join(str(part) for part in error["loc"]) or "(top level)"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            value = error.get("input")
            hidden = isinstance(value, dict) or error["type"] == SECRET_IN_CONFIG
            shown = "" if hidden else f" (got {value!r})"
            lines.append(f"  {location}: {message}{shown}")
        raise ConfigError("\n".join(lines)) from None


def logprob_hardening(policy: LogprobPolicy) -> LogprobHardening:
    """What a tier's logprob policy does to the values it returns."""
    return LogprobHardening(
        noise_scale=policy.noise.scale,
        preserve_order=policy.noise.preserve_order,
        normalize=policy.noise.normalize,
        quantize=policy.quantize.mode,
        grid_step=policy.quantize.step,
        exact_above=policy.exact_sampled_above,
    )


def _resolve_tier(name: str, policy: TierPolicy) -> Tier:
    models = None if "*" in policy.models else frozenset(policy.models)
    return Tier(
        name=name,
        models=models,
        allowed_fields=expand_field_selectors(policy.allow_fields),
        stripped_fields=expand_field_selectors(policy.strip_fields),
        bounds={name: bound for name, bound in policy.bounds.items() if bound is not None},
        max_prompts=policy.max_prompts,
        content_parts=frozenset(policy.content_parts),
        logprobs=policy.logprobs,
        hardening=logprob_hardening(policy.logprobs),
        logit_bias=policy.logit_bias,
        seed=policy.seed,
        detection=policy.detection,
        sampling=policy.sampling,
        embeddings=policy.embeddings,
    )


def _read_secret(source: SecretSource, base: Path, field_path: str) -> bytes:
    """A secret's bytes from its environment variable or file; errors never show the value."""
    if source.env is not None:
        value = os.environ.get(source.env)
        if value is None:
            raise ConfigError(f"{field_path}.env: environment variable {source.env} is not set")
        return value.encode()
    secret_path = base / source.file  # type: ignore[operator]
    try:
        return secret_path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{field_path}.file: cannot read {secret_path}: {exc.strerror}") from None


def _read_credential(source: SecretSource, base: Path, field_path: str) -> str:
    """A key or password for an HTTP header or Redis' AUTH: printable ASCII, no spaces."""
    value = _read_secret(source, base, field_path)
    if not _CREDENTIAL.fullmatch(value):
        raise ConfigError(
            f"{field_path}: the value is empty or not printable ASCII without spaces "
            "(a trailing newline in a file is fine)"
        )
    return value.decode()


def _load_secret(config: GuardConfig, base: Path) -> tuple[bytes, bool]:
    source = config.secret
    if source is None:
        return secrets.token_bytes(MIN_SECRET_BYTES), True
    secret = _read_secret(source, base, "secret")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the server secret must be at least {MIN_SECRET_BYTES} bytes long")
    return secret, False


def _resolve_paths(config: GuardConfig, base: Path) -> GuardConfig:
    """The config with its relative file paths made absolute against the config's folder
    (policy and secret files are resolved where they are read)."""
    audit = config.audit
    if audit.path and audit.path != "-" and not os.path.isabs(audit.path):
        audit = audit.model_copy(update={"path": os.path.abspath(base / audit.path)})
        return config.model_copy(update={"audit": audit})
    return config


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read, validate and resolve the config at ``path`` and every policy file it names."""
    # Absolute but not resolved: a symlink swap (Kubernetes ConfigMaps) must be seen.
    config_path = Path(os.path.abspath(path))
    data, raw = _read_yaml(config_path)
    config = _validate(GuardConfig, data, config_path)
    base = config_path.parent
    config = _resolve_paths(config, base)
    digest = hashlib.sha256(raw)
    files = [config_path]
    tiers: dict[str, Tier] = {}
    tier_policies: dict[str, TierPolicy] = {}
    client_entries: dict[str, tuple[ClientEntry, Path]] = {}
    for policy_name in config.policies:
        policy_path = Path(os.path.abspath(base / policy_name))
        policy_data, policy_raw = _read_yaml(policy_path, allow_empty=False)
        digest.update(policy_raw)
        files.append(policy_path)
        policy = _validate(PolicyFile, policy_data, policy_path)
        for tier_name, tier_policy in policy.tiers.items():
            if tier_name in tiers:
                raise ConfigError(f"{policy_path}: tiers.{tier_name}: tier defined twice")
            tiers[tier_name] = _resolve_tier(tier_name, tier_policy)
            tier_policies[tier_name] = tier_policy
        for client_id, entry in policy.clients.items():
            if client_id in client_entries:
                raise ConfigError(f"{policy_path}: clients.{client_id}: client defined twice")
            client_entries[client_id] = (entry, policy_path)

    model_names = list(config.upstreams) or [config.bundled_teacher.public_name]
    decoy_models = {
        tier.detection.decoy.model
        for tier in tiers.values()
        if tier.detection.decoy.source == "model" and tier.detection.decoy.model
    }
    if decoy_models and decoy_models >= set(model_names):
        raise ConfigError(
            "every configured model is a decoy model (detection.decoy.model): "
            "clients would have no model to call"
        )
    for tier in tiers.values():
        decoy_model = tier.detection.decoy.model
        if decoy_model is not None and decoy_model not in model_names:
            raise ConfigError(
                f"tiers.{tier.name}.detection.decoy.model: unknown model {decoy_model!r}; "
                f"configured models: {', '.join(model_names)}"
            )
        for model in sorted(tier.models or ()):
            if model in decoy_models:
                raise ConfigError(
                    f"tiers.{tier.name}.models: {model!r} is a decoy model (a tier's "
                    "detection.decoy.model): it answers decoyed requests and cannot be offered"
                )
            if model not in model_names:
                raise ConfigError(
                    f"tiers.{tier.name}.models: unknown model {model!r}; "
                    f"configured models: {', '.join(model_names)}"
                )

    clients_by_key_hash: dict[bytes, Client] = {}
    for client_id, (entry, policy_path) in client_entries.items():
        tier_name = entry.tier
        if tier_name not in tiers:
            raise ConfigError(
                f"{policy_path}: clients.{client_id}.tier: unknown tier {tier_name!r}; "
                f"defined tiers: {', '.join(sorted(tiers)) or '(none)'}"
            )
        tier_limits = tier_policies[tier_name].limits
        overrides = entry.limits.model_dump(exclude_unset=True) if entry.limits else {}
        limits = LimitSpec(**{**tier_limits.model_dump(), **overrides})
        tier = tiers[tier_name]
        mode = entry.detection_mode or tier.detection.mode
        client = Client(client_id, tier, limits, mode)
        for key_hash in entry.keys:
            digest_bytes = bytes.fromhex(key_hash.removeprefix("sha256:"))
            if digest_bytes in clients_by_key_hash:
                raise ConfigError(f"{policy_path}: clients.{client_id}.keys: key used twice")
            clients_by_key_hash[digest_bytes] = client

    if config.tracing.otel and (missing := otel_missing_packages()):
        raise ConfigError(
            f"{config_path}: tracing.otel needs the OpenTelemetry packages ({EXTRA_HINT}); "
            f"missing: {', '.join(missing)}"
        )
    secret, ephemeral = _load_secret(config, base)
    api_keys = {
        model: _read_credential(upstream.api_key, base, f"upstreams.{model}.api_key")
        for model, upstream in config.upstreams.items()
        if upstream.api_key is not None
    }
    password = config.state.redis_password
    return Settings(
        path=config_path,
        config=config,
        tiers=tiers,
        clients_by_key_hash=clients_by_key_hash,
        secret=secret,
        secret_is_ephemeral=ephemeral,
        files=tuple(files),
        digest=digest.hexdigest(),
        upstream_api_keys=api_keys,
        redis_password=(
            _read_credential(password, base, "state.redis_password") if password else None
        ),
    )


def files_digest(files: tuple[Path, ...]) -> str | None:
    """The digest of the files' current contents, or None when one cannot be read."""
    digest = hashlib.sha256()
    try:
        for file in files:
            digest.update(file.read_bytes())
    except OSError:
        return None
    return digest.hexdigest()
