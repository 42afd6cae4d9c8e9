"""The risk score: a sum of named, bounded contributions, so every score explains itself.

| signal (kind: V volume, E evidence) | kind | weight | full at |
|---|---|---|---|
| distinct_prompts: distinct prompts in the last day (or week), × novelty 0.2 → 0.5 | V | 0.45
  | 400 → 1,200 (*) |
| novelty: share of the day's requests that are new (≥ 100 requests) | V | 0.10 | 0.7 → 0.98 |
| logprobs: share of requests asking for logprobs at all | V | 0.05 | share 1.0 |
| max_top_logprobs: share of requests asking for the tier's maximal top-k | E | 0.25 | 1.0 |
| regular_timing: clockwork timing (1 − CV of gaps, ≥ 20 requests) | E | 0.15 | 1.0 |
| templated: share of requests with the previous one's fingerprint (same script, template
  head and parameters; ≥ 50 requests) | E | 0.15 | 0.6 → 0.9 |
| logit_bias: share of requests using logit_bias | E | 0.10 | share 1.0 |
| campaign: many keys share the client's fingerprint and together collect much distinct
  data in the last day (× 0.5–1 by their max-top-k share) | E | 0.40 | members 5 → 20,
  distinct 100 → 1,000 |
| end_user_churn: the key named more distinct end users (``safety_identifier`` / ``user``)
  in the last day than its tier's ``detection.end_users.max_distinct_per_day`` (ids invented
  to dodge the per-end-user scope) | E | 0.15 | cap → 2 × cap |

(*) the tier's ``detection.distinct_prompts`` ramp (``start``/``full`` for the day; the week
ramp is five times it). Shares are the profile's decayed shares, bias-corrected for young
clients (:meth:`ClientProfile.share`), so a key's first requests count fully. Volume signals
count only their window (``detection.profile.DAY`` / ``WEEK``): a client's past forgets.
Distinct prompts count in full only for a client whose day is at least half new prompts
(none below a fifth): an application whose users re-ask popular questions collects far
less new data than its distinct count suggests. A client with a long history and no
extraction evidence gets a slower ramp: from a week after its first request, both ramps
stretch, up to twice as wide at five weeks (``TENURE_DAYS``).

**Graduated actions.** The score picks the action from the thresholds, but a text-side
action (``perturb``, ``decoy``, ``block``: they change what the client reads) also needs
extraction-specific evidence: the evidence signals must sum to at least ``evidence_min``
(default 0.375: for example maximal logprobs on every request *and* one template, or maximal
logprobs and clockwork timing, or a campaign). Without it the action
stops at ``tighten``: volume alone (an evaluation run, a busy application) is throttled and
flagged for the operator, never fed wrong answers. The assessment says so (:attr:`Assessment.note`).
"""

from __future__ import annotations

from dataclasses import dataclass

from guard_server.detection.profile import CampaignProfile, ClientProfile

ACTIONS = ("pass", "tighten", "perturb", "decoy", "block")
TEXT_ACTIONS = frozenset({"perturb", "decoy", "block"})
"""Actions that change what the client reads: they need evidence, not volume alone."""
DISTINCT_RAMP = (400, 1200)
"""Distinct prompts in a day at which ``distinct_prompts`` starts to count, and is full."""
WEEK_RAMP_FACTOR = 5
"""The week's distinct-prompts ramp is the day's times this."""
EVIDENCE_MIN = 0.375
"""The evidence signals' sum a text-side action needs (``detection.evidence_min``)."""
TENURE_DAYS = (7, 35)
"""Age (days since the first request) from which a client without evidence gets a slower
volume ramp, and at which the ramp is twice as wide."""
EVIDENCE = frozenset(
    {"max_top_logprobs", "regular_timing", "templated", "logit_bias", "campaign", "end_user_churn"}
)
"""The extraction-specific signals; the others (distinct prompts, novelty, logprobs) measure
volume, which honest heavy clients bring too."""


def _ramp(value: float, low: float, high: float) -> float:
    if value <= low:
        return 0.0
    if value >= high:
        return 1.0
    return (value - low) / (high - low)


@dataclass(slots=True)  # read-only by convention (see detection.profile)
class Assessment:
    """A client's score, what it is made of (non-zero signals only), and its action."""

    score: float
    contributions: dict[str, float]
    action: str
    note: str = ""
    """Why the action is below what the score alone calls for (empty when it is not)."""

    def signals(self) -> dict[str, float]:
        """The contributions rounded for people (audit log, admin API)."""
        return {name: round(value, 4) for name, value in self.contributions.items()}

    @property
    def evidence(self) -> float:
        """The sum of the extraction-specific signals."""
        return sum(v for name, v in self.contributions.items() if name in EVIDENCE)


def contributions(
    profile: ClientProfile,
    campaign: CampaignProfile | None,
    distinct_ramp: tuple[int, int] = DISTINCT_RAMP,
    evidence_min: float = EVIDENCE_MIN,
    end_user_cap: int | None = None,
) -> dict[str, float]:
    """Each signal's share of the score (see the module table). ``end_user_cap``: the
    tier's distinct end users a key may name in a day (None: not watched)."""
    parts = _evidence(profile, campaign, end_user_cap)
    stretch = 1.0
    if sum(parts.values()) < evidence_min:  # no extraction evidence: history counts
        stretch += _ramp(profile.age_s / 86400, *TENURE_DAYS)
    low, high = (stretch * bound for bound in distinct_ramp)
    volume = max(
        _ramp(profile.distinct_prompts, low, high),
        _ramp(profile.distinct_week, WEEK_RAMP_FACTOR * low, WEEK_RAMP_FACTOR * high),
    ) * _ramp(profile.novelty, 0.2, 0.5)
    parts["distinct_prompts"] = 0.45 * volume
    parts["logprobs"] = 0.05 * profile.share(profile.logprob_share)
    parts["novelty"] = 0.10 * _ramp(profile.novelty, 0.7, 0.98) if profile.total >= 100 else 0.0
    return parts


def _evidence(
    profile: ClientProfile, campaign: CampaignProfile | None, end_user_cap: int | None
) -> dict[str, float]:
    """The extraction-specific signals (``EVIDENCE``)."""
    templated = profile.share(profile.templated_share) if profile.total >= 50 else 0.0
    parts = {
        "max_top_logprobs": 0.25 * profile.share(profile.max_top_share),
        "regular_timing": 0.15 * profile.regularity,
        "templated": 0.15 * _ramp(templated, 0.6, 0.9),
        "logit_bias": 0.10 * profile.share(profile.logit_bias_share),
        "campaign": 0.0,
        "end_user_churn": 0.0,
    }
    if end_user_cap is not None and profile.end_users > end_user_cap:
        parts["end_user_churn"] = 0.15 * _ramp(profile.end_users, end_user_cap, 2 * end_user_cap)
    if campaign is not None:
        parts["campaign"] = (
            0.40
            * _ramp(campaign.members, 5, 20)
            * _ramp(campaign.distinct_prompts, 100, 1000)
            * (0.5 + 0.5 * campaign.max_top_share)
        )
    return parts


def assess(
    profile: ClientProfile,
    campaign: CampaignProfile | None,
    thresholds: dict[str, float],
    distinct_ramp: tuple[int, int] = DISTINCT_RAMP,
    evidence_min: float = EVIDENCE_MIN,
    end_user_cap: int | None = None,
) -> Assessment:
    """Score a client and map the score to the highest action whose threshold it reaches;
    a text-side action only with ``evidence_min`` of evidence (else ``tighten``)."""
    parts = contributions(profile, campaign, distinct_ramp, evidence_min, end_user_cap)
    parts = {name: value for name, value in parts.items() if value}
    score = min(1.0, sum(parts.values()))
    action = "pass"
    for name in ACTIONS[1:]:
        if score >= thresholds[name]:
            action = name
    assessment = Assessment(round(score, 4), parts, action)
    if action in TEXT_ACTIONS and assessment.evidence < evidence_min:
        assessment.action = "tighten"
        assessment.note = (
            f"{action} held at tighten: extraction evidence {assessment.evidence:.3f} "
            f"< {evidence_min:g} (volume alone never changes answers)"
        )
    return assessment
