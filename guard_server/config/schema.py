"""The pydantic schema of the guard's YAML configuration and policy files."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from guard_server.detection.scoring import DISTINCT_RAMP, EVIDENCE_MIN
from guard_server.openai_fields import (
    BOUNDABLE,
    CONTENT_PART_TYPES,
    FIELDS,
    REQUIRED,
    expand_field_selectors,
)

_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
SECRET_IN_CONFIG = "secret_in_config"
"""The error type of a value that holds a secret: error messages never repeat it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SystemFingerprint = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[ -~]+$")]


class ServerSettings(_Strict):
    """Where the guard listens and how it treats request bodies."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    policy_header: bool = True
    reload_interval_s: Annotated[float, Field(gt=0)] = 2.0
    drain_timeout_s: Annotated[float, Field(ge=0)] = 60.0
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    system_fingerprint: SystemFingerprint = "auto"
    """What responses carry as ``system_fingerprint``: ``auto`` (the guard's own value, keyed
    by the secret and the public model name), ``pass`` (vLLM's, which names its version), or
    a literal string. ``upstreams.<model>.system_fingerprint`` overrides it per model."""
    write_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """How long one write to a streaming client may wait for the client to read; past it the
    response is ended and the upstream request cancelled."""


class SecretSource(_Strict):
    """Where a secret comes from: an environment variable or a file (relative to the config
    file). The value itself never goes into the YAML."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of `env` or `file`")
        return self


class Timeouts(_Strict):
    """Upstream timeouts in seconds."""

    connect: Annotated[float, Field(gt=0)] = 5.0
    read: Annotated[float, Field(gt=0)] = 120.0
    total: Annotated[float, Field(gt=0)] = 600.0


class UpstreamSettings(_Strict):
    """The vLLM servers behind one public model name."""

    urls: Annotated[list[str], Field(min_length=1)]
    served_model: str | None = None
    # Whether these servers run guard_server.vllm_plugin (then `vllm_xargs` is sent).
    guard_plugin: bool = False
    # Sent as `Authorization: Bearer` to servers started with `--api-key` (or VLLM_API_KEY).
    api_key: SecretSource | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: Annotated[int, Field(ge=1)] = 256
    health_interval_s: Annotated[float, Field(gt=0)] = 5.0
    # Consecutive failed /health probes before an endpoint stops getting requests (a refused
    # connection during a request takes it out at once).
    unhealthy_after: Annotated[int, Field(ge=1)] = 3
    system_fingerprint: SystemFingerprint | None = None  # None: server.system_fingerprint

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in urls]


class StateSettings(_Strict):
    """Where shared state (limits, risk scores) lives."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretSource | None = None  # Redis' `requirepass` (or the ACL user's)
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$")] = "guard"
    timeout_s: Annotated[float, Field(gt=0, le=5)] = 0.25
    on_failure: Literal["open", "closed"] = "open"

    @field_validator("redis_url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        try:
            password = urlsplit(url).password
        except ValueError:
            raise ValueError("not a valid URL") from None
        if password:
            # its own error type: the loader does not echo the value (it holds the password)
            raise PydanticCustomError(
                SECRET_IN_CONFIG,
                "the URL holds a password: put it in `redis_password` ({env: ...} or "
                "{file: ...}) so that the config holds no secret",
            )
        return url


class RateLimits(_Strict):
    """Per-client limits; unset means unlimited."""

    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    concurrent_requests: Annotated[int, Field(ge=1)] | None = None


DEFAULT_METRICS_PORT = 9464


class MetricsSettings(_Strict):
    """Prometheus options: where ``/metrics`` is served, and who may read it.

    By default it has a port of its own, never the API port: its counters (decoys served,
    flagged clients) would tell a client it was caught. ``port: null`` serves it on the API
    port instead, which then needs ``token_hash``.
    """

    client_label: bool = False
    # guard_client_risk shows this many clients at most: the review board's top (0: none).
    top_clients: Annotated[int, Field(ge=0, le=1000)] = 20
    port: Annotated[int, Field(ge=0, le=65535)] | None = DEFAULT_METRICS_PORT
    host: str | None = None  # the metrics listener's address; default server.host
    token_hash: str | None = None  # sha256 of a bearer token /metrics then requires

    @field_validator("token_hash")
    @classmethod
    def _hash_only(cls, value: str | None) -> str | None:
        if value is not None and not _KEY_HASH.match(value):
            raise ValueError("store the metrics token as 'sha256:<64 lowercase hex>'")
        return value

    @model_validator(mode="after")
    def _not_open_on_the_api_port(self) -> MetricsSettings:
        if self.port is None and self.token_hash is None:
            raise ValueError(
                "`port: null` serves /metrics on the API port, where clients could read it: "
                "set `token_hash` too, or give /metrics a port of its own"
            )
        return self


class BundledTeacherSettings(_Strict):
    """How `serve` runs a managed model on vLLM when no upstream is configured."""

    # `arithmetic`: the bundled teacher (in the package); `smollm2`: SmolLM2-135M-Instruct,
    # converted by scripts/install-smollm2.sh (guard_server.upstream.smollm2).
    model: Literal["arithmetic", "smollm2"] = "arithmetic"
    model_name: str | None = None  # the public model name; default: `teacher` / `smollm2`
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    startup_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    max_logprobs: Annotated[int, Field(ge=0)] = 20
    plugin: bool = True  # load guard_server.vllm_plugin into the managed vLLM

    @property
    def public_name(self) -> str:
        """The model name clients send."""
        return self.model_name or ("teacher" if self.model == "arithmetic" else self.model)


class AdminSettings(_Strict):
    """The admin API (``/admin/...``), protected by its own key."""

    key_hash: str | None = None

    @field_validator("key_hash")
    @classmethod
    def _hash_only(cls, value: str | None) -> str | None:
        if value is not None and not _KEY_HASH.match(value):
            raise ValueError("store the admin key as 'sha256:<64 lowercase hex>'")
        return value


class AuditSettings(_Strict):
    """The JSON-lines audit log of decisions."""

    # A file (relative to the config file; one per worker with several workers), or "-":
    # standard output.
    path: str | None = None
    max_bytes: Annotated[int, Field(ge=4096)] = 50_000_000
    backups: Annotated[int, Field(ge=0)] = 5
    include_prompts: bool = False
    only_flagged: bool = False


class LoggingSettings(_Strict):
    """The guard's own logs (stderr); ``serve --log-format/--log-level`` override."""

    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    access_log: bool = False  # one line per HTTP request, with its request id

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class TracingSettings(_Strict):
    """OpenTelemetry spans for each ``/v1`` request and its upstream call (the ``otel``
    extra: ``pip install 'guard-server[otel]'``), exported over OTLP/HTTP."""

    otel: bool = False
    service_name: str = "guard-server"
    # OTLP/HTTP traces URL; unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    # OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces, else http://localhost:4318/v1/traces
    otlp_endpoint: str | None = None


class GuardConfig(_Strict):
    """The top-level guard configuration file."""

    server: ServerSettings = ServerSettings()
    upstreams: dict[str, UpstreamSettings] = {}
    secret: SecretSource | None = None
    state: StateSettings = StateSettings()
    metrics: MetricsSettings = MetricsSettings()
    bundled_teacher: BundledTeacherSettings = BundledTeacherSettings()
    admin: AdminSettings = AdminSettings()
    audit: AuditSettings = AuditSettings()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()
    policies: list[str] = []

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> GuardConfig:
        port = self.metrics.port
        if port and port == self.server.port:
            raise ValueError(
                f"metrics.port: {port} is also server.port; give /metrics a port of its own"
            )
        return self


class Bound(_Strict):
    """Bounds on one numeric request field, and what happens outside them."""

    min: float | None = None
    max: float | None = None
    on_exceed: Literal["clamp", "reject"] = "reject"

    @model_validator(mode="after")
    def _ordered(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("set `min`, `max` or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class LogprobNoise(_Strict):
    """Keyed noise on returned logprob values (see guard_server.defences.logprobs)."""

    scale: Annotated[float, Field(ge=0, le=50)] = 1.0
    preserve_order: bool = True
    normalize: bool = True


class LogprobQuantize(_Strict):
    """Rounding of returned logprob values: to a grid (down), or ranks only."""

    mode: Literal["none", "grid", "rank"] = "grid"
    step: Annotated[float, Field(gt=0, le=10)] = 0.5


class LogprobPolicy(_Strict):
    """What the logprob channel reveals to one tier."""

    max_top: Annotated[int, Field(ge=0, le=1000)] = 5
    on_exceed: Literal["clamp", "reject"] = "clamp"
    noise: LogprobNoise = LogprobNoise()
    quantize: LogprobQuantize = LogprobQuantize()
    exact_sampled_above: Annotated[float, Field(gt=0.5, le=1)] | None = None
    """The sampled token's own value comes back exact when its probability is at least this
    (so it is the position's top token); the others are hardened into the mass it leaves."""
    allow_echo: bool = False
    with_constraints: Literal["reject", "strip", "allow"] = "reject"
    """Logprobs together with constrained decoding (structured outputs, a JSON
    ``response_format``, forced tool calls, ``allowed_token_ids``): vLLM renormalises the
    returned values over the tokens the constraint allows, so they are exact logit differences
    between tokens the client picked. ``reject``: 400; ``strip``: drop the logprobs;
    ``allow``: return them (hardened as usual, never one exact value)."""

    @model_validator(mode="after")
    def _exact_needs_values(self) -> LogprobPolicy:
        if self.exact_sampled_above is None:
            return self
        if self.quantize.mode == "rank":
            raise ValueError(
                "`exact_sampled_above` returns a value, so not with `quantize.mode: rank`"
            )
        if not self.noise.normalize:
            raise ValueError(
                "`exact_sampled_above` needs `noise.normalize: true` (the other values must fit "
                "in the mass the exact one leaves)"
            )
        return self


class LogitBiasPolicy(_Strict):
    """How `logit_bias` is treated, when the tier allows the field at all."""

    mode: Literal["allow", "strip", "reject", "limit"] = "limit"
    max_entries: Annotated[int, Field(ge=0)] = 10
    max_abs: Annotated[float, Field(ge=0, le=100)] = 5.0
    with_logprobs: Literal["allow", "reject"] = "reject"


class SamplingNoise(_Strict):
    """Keyed noise added to the logits inside vLLM (needs the guard's plugin upstream)."""

    sigma: Annotated[float, Field(ge=0, le=20)] = 0.0
    kind: Literal["gumbel", "gaussian"] = "gumbel"


class SamplingBounds(_Strict):
    """Sampling bounds forced inside vLLM, whatever the client asks."""

    top_k: Annotated[int, Field(ge=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None


class Watermark(_Strict):
    """A green-list watermark keyed to each client (Kirchenbauer et al. 2023)."""

    enabled: bool = False
    gamma: Annotated[float, Field(gt=0, lt=1)] = 0.25
    delta: Annotated[float, Field(ge=0, le=20)] = 2.0


class SamplingPolicy(_Strict):
    """What the guard's vLLM plugin does to this tier's sampling."""

    noise: SamplingNoise = SamplingNoise()
    bounds: SamplingBounds = SamplingBounds()
    watermark: Watermark = Watermark()


class EmbeddingsPolicy(_Strict):
    """What ``/v1/embeddings`` returns to one tier (guard_server.defences.embeddings).

    Embeddings are an extraction channel: a copy model can be trained on the vectors. The
    noise is keyed by the server secret, the client and the input's canonical identity, so
    repeating an input returns the same vector and averaging repeats gains nothing.
    """

    noise: Annotated[float, Field(ge=0, le=2)] = 0.0
    """Keyed Gaussian noise, as a fraction of the vector's norm (``0.05``: a noise vector
    about 5 % as long as the embedding); ``0``: off."""
    flagged_noise: Annotated[float, Field(ge=0, le=2)] = 0.0
    """The noise from the ``perturb`` action on (the larger of this and ``noise``)."""
    quantize_bits: Annotated[int, Field(ge=1, le=16)] | None = None
    """Round each coordinate to one of 2**bits levels over the vector's range; unset: off."""
    max_inputs: Annotated[int, Field(ge=1, le=2048)] = 256
    """Inputs one request may carry (``input`` as a list); more is 400. Each counts as one
    request in the rate limits."""


class ActionThresholds(_Strict):
    """Risk scores (0..1) from which each action applies."""

    tighten: Annotated[float, Field(ge=0, le=1)] = 0.35
    perturb: Annotated[float, Field(ge=0, le=1)] = 0.4
    decoy: Annotated[float, Field(ge=0, le=1)] = 0.45
    block: Annotated[float, Field(ge=0, le=1.01)] = 0.95

    @cached_property
    def by_action(self) -> dict[str, float]:
        """{action: threshold}, built once per policy load (scoring reads it per request)."""
        return self.model_dump()

    @model_validator(mode="after")
    def _ascending(self) -> ActionThresholds:
        if not self.tighten <= self.perturb <= self.decoy <= self.block:
            raise ValueError("thresholds must satisfy tighten <= perturb <= decoy <= block")
        return self


class PerturbAction(_Strict):
    """Stronger perturbation for clients at the perturb level and above."""

    max_top: Annotated[int, Field(ge=0)] = 1
    noise_scale: Annotated[float, Field(ge=0, le=50)] = 3.0
    sampling_sigma: Annotated[float, Field(ge=0, le=20)] = 1.0


class DecoyAction(_Strict):
    """Where decoy answers come from."""

    source: Literal["misinformation", "model", "perturbed"] = "misinformation"
    perturbed_sigma: Annotated[float, Field(gt=0, le=20)] = 4.0
    model: str | None = None

    @model_validator(mode="after")
    def _model_for_model_source(self) -> DecoyAction:
        if self.source == "model" and not self.model:
            raise ValueError("source `model` needs `model`: the upstream model that answers")
        return self


class DistinctPromptsRamp(_Strict):
    """How many distinct prompts a client may collect in a day before volume raises its risk:
    the ``distinct_prompts`` signal is 0 up to ``start`` and full from ``full`` (over a week:
    five times both)."""

    start: Annotated[int, Field(ge=0)] = DISTINCT_RAMP[0]
    full: Annotated[int, Field(gt=0)] = DISTINCT_RAMP[1]

    @cached_property
    def bounds(self) -> tuple[int, int]:
        """(start, full), built once per policy load."""
        return self.start, self.full

    @model_validator(mode="after")
    def _ordered(self) -> DistinctPromptsRamp:
        if self.start >= self.full:
            raise ValueError("distinct_prompts: start must be below full")
        return self


class EndUserPolicy(_Strict):
    """End users inside one key: a request naming one (``safety_identifier``, else ``user``)
    is also scored in the end user's own scope (while it is new, also among the key's
    newcomers of the request's shape), and the key is watched for invented ids.

    Off unless a tier opts in (the shipped ``application`` tier): for an end user's requests
    the key's action stops at ``tighten``, so on a tier whose clients are not known
    applications a collector naming a fresh id per request would dodge its key's decoy."""

    enabled: bool = False
    max_distinct_per_day: Annotated[int, Field(gt=0)] = 10_000
    """Distinct end users a key may name in a day. Beyond it the key's end users are no
    longer acted on one by one (only the key's own scope decides), and the excess raises the
    key's risk (``end_user_churn``, up to 0.15 at twice the cap)."""


DetectionMode = Literal["enforce", "shadow"]


class DetectionPolicy(_Strict):
    """Extraction-risk scoring and the actions it drives."""

    enabled: bool = True
    mode: DetectionMode = "enforce"
    """``shadow``: score and record the action the score calls for, but serve as ``pass``."""
    thresholds: ActionThresholds = ActionThresholds()
    distinct_prompts: DistinctPromptsRamp = DistinctPromptsRamp()
    evidence_min: Annotated[float, Field(ge=0, le=1)] = EVIDENCE_MIN
    """The extraction-specific evidence (the score's evidence signals) a text-side action
    (perturb, decoy, block) needs; below it the action stops at ``tighten``."""
    tighten_factor: Annotated[float, Field(gt=0, le=1)] = 0.25
    end_users: EndUserPolicy = EndUserPolicy()
    perturb: PerturbAction = PerturbAction()
    decoy: DecoyAction = DecoyAction()


DEFAULT_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(max=8192, on_exceed="clamp"),
    "n": Bound(max=4, on_exceed="reject"),
    "temperature": Bound(min=0, max=2, on_exceed="reject"),
    "prompt_logprobs": Bound(max=5, on_exceed="clamp"),
}
"""The bounds a tier gets for every field it does not bound itself (``null`` opts out)."""


class TierPolicy(_Strict):
    """What one tier's clients may ask for. Every key left out takes its safe value."""

    models: list[str] = ["*"]
    allow_fields: list[str] = ["@openai", "@vllm_sampling"]
    """Fields passed to vLLM, by group or name."""
    strip_fields: list[str] = ["@openai_platform"]
    """Fields accepted and dropped before vLLM, named in ``x-guard-policy``; any field in
    neither list is 400."""
    bounds: Annotated[dict[str, Bound | None], Field(validate_default=True)] = {}
    """Merged over :data:`DEFAULT_BOUNDS`; a field set to ``null`` is left unbounded."""
    max_prompts: Annotated[int, Field(ge=1)] = 4
    """Prompts one completions request may batch (``prompt`` as a list); more is 400."""
    content_parts: list[str] = ["text"]
    """Chat content-part types the tier may send (``type`` of each part); others are 400."""
    logprobs: LogprobPolicy = LogprobPolicy()
    logit_bias: LogitBiasPolicy = LogitBiasPolicy()
    seed: Literal["allow", "strip", "rekey"] = "rekey"
    limits: RateLimits = RateLimits()
    detection: DetectionPolicy = DetectionPolicy()
    sampling: SamplingPolicy = SamplingPolicy()
    embeddings: EmbeddingsPolicy = EmbeddingsPolicy()

    @field_validator("allow_fields")
    @classmethod
    def _known_fields(cls, selectors: list[str]) -> list[str]:
        names = expand_field_selectors(selectors)
        for required in ("model",):
            if required not in names:
                raise ValueError(f"{required!r} must be allowed")
        for name in sorted(names):
            why = FIELDS[name].unpassable
            if why is not None:
                raise ValueError(
                    f"{name!r} cannot be passed to vLLM ({why}); list it in strip_fields to "
                    "accept and drop it, or leave it out to refuse it"
                )
        return selectors

    @field_validator("strip_fields")
    @classmethod
    def _strippable(cls, selectors: list[str]) -> list[str]:
        names = expand_field_selectors(selectors)
        required = sorted({name for fields in REQUIRED.values() for name in fields} & names)
        if required:
            raise ValueError(f"required fields cannot be stripped: {', '.join(required)}")
        return selectors

    @model_validator(mode="after")
    def _pass_or_strip(self) -> TierPolicy:
        both = expand_field_selectors(self.allow_fields) & expand_field_selectors(self.strip_fields)
        if both:
            raise ValueError(
                f"field(s) {', '.join(sorted(both))} are in both allow_fields and strip_fields"
            )
        return self

    @field_validator("bounds")
    @classmethod
    def _boundable(cls, bounds: dict[str, Bound | None]) -> dict[str, Bound | None]:
        for name in bounds:
            if name not in BOUNDABLE:
                raise ValueError(
                    f"{name!r} cannot be bounded; boundable fields: {', '.join(sorted(BOUNDABLE))}"
                )
        merged = {**DEFAULT_BOUNDS, **bounds}
        return {name: bound for name, bound in merged.items() if bound is not None}

    @field_validator("content_parts")
    @classmethod
    def _known_parts(cls, parts: list[str]) -> list[str]:
        unknown = sorted(set(parts) - CONTENT_PART_TYPES)
        if unknown:
            raise ValueError(
                f"unknown content part type(s) {', '.join(map(repr, unknown))}; known types: "
                + ", ".join(sorted(CONTENT_PART_TYPES))
            )
        return parts


class ClientEntry(_Strict):
    """One API client: its tier and the sha256 hashes of its keys."""

    tier: str
    keys: Annotated[list[str], Field(min_length=1)]
    limits: RateLimits | None = None  # fields set here override the tier's
    detection_mode: DetectionMode | None = None  # overrides the tier's detection.mode

    @field_validator("keys")
    @classmethod
    def _hashes_only(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not _KEY_HASH.match(key):
                raise ValueError(
                    "keys must be stored as 'sha256:<64 lowercase hex>' "
                    "(see `guard-server hash-key`), never in plain text"
                )
        return keys


ClientId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]


class PolicyFile(_Strict):
    """A policy file: tiers and/or clients."""

    tiers: dict[str, TierPolicy] = {}
    clients: dict[ClientId, ClientEntry] = {}
