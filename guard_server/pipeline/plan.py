"""Plan: turn the client's risk into one immutable decision for the request.

The plan holds everything the later stages act on: the action, the limits admission
applies (and the client's own, which its headers show), the logprob cap and hardening, the
sampling controls sent to the plugin and the decoy. Admission, the upstream rewrite, the
response transform, the audit log and the metrics read only the plan, so all of them agree
on what was done and why.

In ``shadow`` detection mode the plan records the action the score calls for
(``assessed``) and serves the request as ``pass``. An operator's pin overrides both the
score and the mode: ``allow`` serves the request as ``pass``, ``deny`` blocks it; the score
is still computed and recorded as ``assessed``.

A request naming an end user is assessed in the key's scope and the end user's (and, for
a new end user, among the key's newcomers of the request's shape:
:mod:`guard_server.detection.end_users`). The key's action stops at ``tighten`` for it and
the most severe of the three decides (``end_users.decide``), so one abusive end user of an
application is acted on for its own requests only, and an end user's answers never change
because of another's traffic. Tightened limits apply to a bucket of the deciding scope's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from guard_server.config.loader import Client
from guard_server.defences.logprobs import LogprobHardening
from guard_server.detection.end_users import END_USER, NEWCOMERS, decide, end_user_scope
from guard_server.detection.scoring import ACTIONS, Assessment
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.decoy import DecoyPlan, plan_decoy
from guard_server.pipeline.logprob_channel import constraint_of
from guard_server.pipeline.sampling import SamplingPlan
from guard_server.state.base import LimitSpec
from guard_server.state.review import Pin, ReviewState

_RANK = {action: rank for rank, action in enumerate(ACTIONS)}
_CAMPAIGN_SIGNAL = 0.2
_REASON_SIGNALS = 3  # the largest contributions named in a plan's reason
_END_USER_SHOWN = 64  # characters of an end user's id in a plan's reason


@dataclass(frozen=True, slots=True)
class EndUser:
    """The end user a request named, its scope and its own assessment (None: not scored),
    and while it is new, its newcomers' scope and assessment."""

    name: str  # as the request sent it (safety_identifier, else user)
    scope: str  # the store scope it is scored in (end_user_scope)
    assessment: Assessment | None
    newcomers: Assessment | None = None
    newcomers_scope: str = ""  # end_users.newcomer_scope, when `newcomers` is set


@dataclass(frozen=True, slots=True)
class Plan:
    """The one decision taken for a request. Read-only: no stage changes it."""

    action: str  # what is done: pass, tighten, perturb, decoy or block
    assessed: str  # what the risk score calls for (differs from `action` in shadow mode)
    mode: str  # enforce or shadow
    # What `reason` is worded from: worded only when read (the audit log), not per request.
    basis: tuple[Client, Assessment | None, Pin | None, EndUser | None]
    limits: LimitSpec  # what admission applies (tightened from `tighten` on)
    advertised: LimitSpec  # what x-ratelimit-limit-* shows: the client's configured limits
    logprob_cap: int  # the tier's: a flagged client gets as many values back as any other
    hardening: LogprobHardening
    sampling: SamplingPlan
    decoy: DecoyPlan | None
    pin: str | None = None  # allow or deny: an operator's pin decided `action`
    scope: str = ""  # whose score decided: the client's id, or an end user's scope
    limit_scope: str = ""  # the rate-limit bucket admission charges

    @property
    def by_end_user(self) -> bool:
        """Whether an end-user scope decided (its own or its newcomers'), not the key's."""
        end_user = self.basis[3]
        return end_user is not None and self.scope != self.basis[0].id

    @property
    def reason(self) -> str:
        """For operators: the score, its threshold and its largest signals (and any pin)."""
        return _reason(*self.basis)

    @property
    def counted(self) -> tuple[str, str]:
        """The (action, mode) the metrics count: the action taken, or in shadow mode the
        action the score called for; a pinned request counts its action under ``pinned``."""
        if self.pin is not None:
            return self.action, "pinned"
        return self.assessed, self.mode

    @property
    def upstream_model(self) -> str | None:
        """The model that answers instead of the requested one (a decoy model), if any."""
        return self.decoy.model if self.decoy is not None else None


def planned_action(client: Client, assessed: str, pin: Pin | None) -> str:
    """What is done to a client whose score calls for ``assessed``: the pin's action, else
    the score's in enforce mode and ``pass`` in shadow mode."""
    if pin is not None:
        return "pass" if pin.action == "allow" else "block"
    return assessed if client.detection_mode == "enforce" else "pass"


def limits_of(client: Client, action: str) -> LimitSpec:
    """The limits admission applies to a request of ``client`` planned as ``action``: its
    own, tightened from ``tighten`` on."""
    if _RANK[action] == 0:
        return client.limits
    return _tightened(client.limits, client.tier.detection.tighten_factor)


def make_plan(
    secret: bytes,
    client: Client,
    assessment: Assessment | None,
    identities: tuple[bytes, ...] = (b"",),
    constrained: bool = False,
    *,
    pin: Pin | None = None,
    decoys: bool = True,
    end_user: EndUser | None = None,
) -> Plan:
    """The plan for one request of ``client`` at its current ``assessment`` and ``pin``.
    ``identities`` (the canonical identity of each prompt) key the misinformation decoy's
    digit maps; under constrained decoding (``constrained``) no logprob value comes back
    exact. Without ``decoys`` (embeddings: no text to replace) the ``decoy`` action plans
    none; the vector policy's ``flagged_noise`` applies instead. ``end_user``: the end user
    the request named, with its own assessment."""
    tier = client.tier
    detection = tier.detection
    scope = client.id
    if end_user is not None:
        assessment, whose = decide(assessment, end_user.assessment, end_user.newcomers)
        if whose == END_USER:
            scope = end_user.scope
        elif whose == NEWCOMERS:
            scope = end_user.newcomers_scope
    assessed = assessment.action if assessment is not None else "pass"
    mode = client.detection_mode
    action = planned_action(client, assessed, pin)
    rank = _RANK[action]
    perturb = detection.perturb
    logprob_cap = tier.logprobs.max_top
    hardening = tier.hardening
    if constrained and hardening.exact_above is not None:
        hardening = replace(hardening, exact_above=None)
    sigma = tier.sampling.noise.sigma
    if rank >= _RANK["perturb"]:
        # Same count back as any client of the tier (a smaller one would tell): only the
        # first `max_top` keep their rank, the rest come back in a keyed order, all noisier.
        hardening = replace(
            hardening,
            noise_scale=max(hardening.noise_scale, perturb.noise_scale),
            ranked=perturb.max_top,
        )
        sigma = max(sigma, perturb.sampling_sigma)
    decoy = plan_decoy(secret, client, identities) if action == "decoy" and decoys else None
    if decoy is not None:
        sigma = max(sigma, decoy.sigma)
    return Plan(
        action=action,
        assessed=assessed,
        mode=mode,
        basis=(client, assessment, pin, end_user),
        limits=limits_of(client, action),
        advertised=client.limits,
        logprob_cap=logprob_cap,
        hardening=hardening,
        sampling=SamplingPlan(
            noise_sigma=sigma,
            noise_kind=tier.sampling.noise.kind,
            bounds=tier.sampling.bounds,
            watermark=tier.sampling.watermark,
        ),
        decoy=decoy,
        pin=pin.action if pin is not None else None,
        scope=scope,
        limit_scope=f"c:{scope}" if rank else f"c:{client.id}",
    )


def _tightened(limits: LimitSpec, factor: float) -> LimitSpec:
    def scaled(value: int | None) -> int | None:
        return None if value is None else max(1, int(value * factor))

    return LimitSpec(
        scaled(limits.requests_per_minute),
        scaled(limits.tokens_per_minute),
        scaled(limits.concurrent_requests),
    )


def _reason(
    client: Client, assessment: Assessment | None, pin: Pin | None, end_user: EndUser | None
) -> str:
    """Why the plan is what it is, in words an operator can read in the audit log.
    ``assessment`` is the one that decided (``end_users.decide``: the key's, held at
    ``tighten`` for an end user, the end user's own or its newcomers')."""
    reason = _score_reason(client, assessment)
    if end_user is not None and assessment is not None:
        shown = repr(end_user.name[:_END_USER_SHOWN])
        if assessment is end_user.assessment:
            reason = f"end user {shown} ({end_user.scope}): {reason}"
        elif assessment is end_user.newcomers:
            reason = (
                f"new end user {shown}, among the key's newcomers of this request's shape "
                f"({end_user.newcomers_scope}): {reason}"
            )
    if pin is None:
        return reason
    by = f" by {pin.by}" if pin.by else ""
    return f"pinned {pin.action} until {pin.until_iso}{by}; {reason}"


def _score_reason(client: Client, assessment: Assessment | None) -> str:
    if not client.tier.detection.enabled:
        return "detection is off for this tier"
    if assessment is None:
        return "not scored (state backend unavailable)"
    thresholds = client.tier.detection.thresholds.by_action
    action = assessment.action
    if action == "pass":
        head = f"risk {assessment.score:.3f} < tighten {thresholds['tighten']:g}"
    else:
        head = f"risk {assessment.score:.3f} >= {action} {thresholds[action]:g}"
    largest = sorted(assessment.contributions.items(), key=lambda item: -item[1])
    named = ", ".join(f"{name} {value:.3f}" for name, value in largest[:_REASON_SIGNALS])
    reason = f"{head} ({named})" if named else head
    return f"{reason}; {assessment.note}" if assessment.note else reason


class Planner:
    """The plan stage; also keeps this replica's view of flagged clients for the gauges, and
    notes every assessment on the review board (``review``: pins and the board; none in
    unit tests of other stages)."""

    def __init__(
        self, metrics: GuardMetrics, review: ReviewState | None = None, max_tracked: int = 100_000
    ) -> None:
        self.metrics = metrics
        self.review = review
        self._actions: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._campaign_fingerprints: OrderedDict[str, None] = OrderedDict()
        self._max_tracked = max_tracked

    async def __call__(self, ctx: RequestContext) -> None:
        client = ctx.client
        assert client is not None
        assessment = ctx.assessment
        assert ctx.canonical is not None
        review = self.review
        pin = review.pin_of(client.id) if review is not None else None
        constrained = constraint_of(ctx.endpoint, ctx.body) is not None
        end_user = None
        if ctx.end_user is not None and client.tier.detection.end_users.enabled:
            scope = end_user_scope(client.id, ctx.end_user)
            end_user = EndUser(
                ctx.end_user,
                scope,
                ctx.end_user_assessment,
                ctx.newcomers_assessment,
                ctx.newcomers_scope or "",
            )
            if pin is None and review is not None:
                pin = review.pin_of(scope)  # an operator's pin of this end user alone
                if pin is None and ctx.newcomers_scope is not None:
                    pin = review.pin_of(ctx.newcomers_scope)  # ... or of its newcomers
        plan = ctx.plan = make_plan(
            ctx.settings.secret,
            client,
            assessment,
            ctx.canonical.identities,
            constrained,
            pin=pin,
            decoys=ctx.endpoint is not Endpoint.EMBEDDINGS,
            end_user=end_user,
        )
        self._track(plan.scope, *plan.counted)
        if end_user is not None and plan.scope != end_user.scope:
            self._track(end_user.scope, "pass", plan.mode)  # no longer flagged on its own
        if review is not None and assessment is not None:
            review.note(client.id, assessment.score, assessment.action)
            if end_user is not None:
                self._note_end_user(review, end_user)
        if assessment and assessment.contributions.get("campaign", 0) >= _CAMPAIGN_SIGNAL:
            self._note_campaign(ctx.fingerprint)

    @staticmethod
    def _note_end_user(review: ReviewState, end_user: EndUser) -> None:
        """Put an end user's scopes on the board: its newcomers' while it is new, its own
        once it has a history or its own scope acts on it (so ids invented per request
        are on the board as one entry, their shape's)."""
        if end_user.newcomers is not None:
            review.note(
                end_user.newcomers_scope, end_user.newcomers.score, end_user.newcomers.action
            )
        elif end_user.assessment is not None:
            review.note(end_user.scope, end_user.assessment.score, end_user.assessment.action)

    def expected_limits(self, client: Client, assessment: Assessment | None) -> LimitSpec | None:
        """The limits a request of ``client`` will be admitted under if the plan assesses it
        as ``assessment`` (None: it will be blocked), for a speculative admission."""
        pin = self.review.pin_of(client.id) if self.review is not None else None
        assessed = assessment.action if assessment is not None else "pass"
        action = planned_action(client, assessed, pin)
        return None if action == "block" else limits_of(client, action)

    def _track(self, client_id: str, action: str, mode: str) -> None:
        gauge = self.metrics.flagged_clients
        previous = self._actions.pop(client_id, None)
        if previous is not None:
            gauge.labels(*previous).dec()
        if action != "pass":
            self._actions[client_id] = (action, mode)
            gauge.labels(action, mode).inc()
            if len(self._actions) > self._max_tracked:
                _, dropped = self._actions.popitem(last=False)
                gauge.labels(*dropped).dec()

    def forget(self, client_id: str) -> None:
        """Drop the client from the flagged-clients gauge (its profile was reset)."""
        previous = self._actions.pop(client_id, None)
        if previous is not None:
            self.metrics.flagged_clients.labels(*previous).dec()

    def _note_campaign(self, fingerprint: str) -> None:
        if fingerprint in self._campaign_fingerprints:
            return
        self._campaign_fingerprints[fingerprint] = None
        if len(self._campaign_fingerprints) > self._max_tracked:
            self._campaign_fingerprints.popitem(last=False)
        self.metrics.campaigns.inc()
