"""The state one request carries through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDictProxy

from guard_server.canonical import CanonicalInput
from guard_server.config.loader import Client, Settings
from guard_server.correlation import Correlation
from guard_server.detection.features import RequestFeatures
from guard_server.detection.scoring import Assessment
from guard_server.openai_fields import Endpoint
from guard_server.state.base import Admission, AdmitRequest

if TYPE_CHECKING:
    from guard_server.pipeline.plan import Plan


@dataclass(slots=True)
class RequestContext:
    """Everything the stages know about one generation request."""

    endpoint: Endpoint
    settings: Settings
    headers: CIMultiDictProxy[str]
    started: float
    correlation: Correlation | None = None  # the request id and trace context
    client: Client | None = None
    body: dict[str, Any] = field(default_factory=dict)
    canonical: CanonicalInput | None = None  # set by the canonicalize stage, after the policy
    model: str = ""
    max_model_len: int | None = None  # the model's context length, when its upstream said
    stream: bool = False
    client_wants_usage: bool = False
    response_headers: dict[str, str] = field(default_factory=dict)
    admission: Admission | None = None
    # What the score stage admitted with the observation, under the limits the plan was
    # expected to have (a speculative store only): (request, verdict); the verdict is None
    # when nothing was decided (deferred), the request None when none was expected.
    speculation: tuple[AdmitRequest | None, Admission | None] | None = None
    # A speculative admission whose call failed (it may still run: its slot is released)
    lost_speculation: AdmitRequest | None = None
    token_ceiling: int = 0  # the most tokens the request may use (admission's full estimate)
    policy_actions: list[tuple[str, str]] = field(default_factory=list)  # (action, field)
    end_user: str | None = None  # the client's safety_identifier or user, if it names one
    status: int = 0
    upstream_seconds: float = 0.0
    first_token_at: float | None = None
    assessment: Assessment | None = None  # the key's
    end_user_assessment: Assessment | None = None  # the end user's own scope's, if scored
    newcomers_assessment: Assessment | None = None  # a new end user's newcomers' scope's
    newcomers_scope: str | None = None  # ... and that scope (end_users.newcomer_scope)
    features: RequestFeatures | None = None  # what detection counted (the audit log's)
    scored_at: float = 0.0  # wall-clock time detection counted the request at
    fingerprint: str = ""
    body_hash: str = ""
    plan: Plan | None = None  # set once by the plan stage, read by every later one
    logprob_keys: dict[int, bytes] = field(default_factory=dict)  # per prompt of the request
    # per choice (responses: per output text), streams
    logprob_positions: dict[int | tuple[int, int], int] = field(default_factory=dict)
    echo: dict[str, Any] = field(default_factory=dict)  # responses: request fields to echo
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def note(self, action: str, field_name: str) -> None:
        """Record a rewrite for ``x-guard-policy``, the audit log and the metrics (once)."""
        entry = (action, field_name)
        if entry not in self.policy_actions:
            self.policy_actions.append(entry)

    @property
    def tier_name(self) -> str:
        """The caller's tier, or ``none`` before authentication succeeded."""
        return self.client.tier.name if self.client else "none"
