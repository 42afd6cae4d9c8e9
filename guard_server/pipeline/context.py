"""The state one request carries through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy

from guard_server.config.loader import Client, Settings
from guard_server.defences.logprobs import LogprobHardening
from guard_server.detection.scoring import Assessment
from guard_server.openai_fields import Endpoint
from guard_server.state.base import Admission


@dataclass(slots=True)
class RequestContext:
    """Everything the stages know about one generation request."""

    endpoint: Endpoint
    settings: Settings
    headers: CIMultiDictProxy[str]
    started: float
    client: Client | None = None
    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    stream: bool = False
    client_wants_usage: bool = False
    response_headers: dict[str, str] = field(default_factory=dict)
    admission: Admission | None = None
    policy_actions: list[tuple[str, str]] = field(default_factory=list)  # (action, field)
    status: int = 0
    upstream_seconds: float = 0.0
    first_token_at: float | None = None
    assessment: Assessment | None = None
    fingerprint: str = ""
    body_hash: str = ""
    action: str = "pass"
    hardening: LogprobHardening | None = None  # overrides the tier's (perturb action)
    decoy_source: str | None = None
    digit_map: dict[int, str] | None = None
    upstream_model: str | None = None  # a decoy model answers instead
    logprob_key: bytes | None = None
    logprob_positions: dict[int, int] = field(default_factory=dict)  # per choice, streams
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tier_name(self) -> str:
        """The caller's tier, or ``none`` before authentication succeeded."""
        return self.client.tier.name if self.client else "none"
