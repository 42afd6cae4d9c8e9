"""The risk score: a sum of named, bounded contributions, so every score explains itself.

| signal | weight | full at |
|---|---|---|
| distinct_prompts: how much distinct data the client has collected | 0.45 | 400 → 1,200 (*) |
| max_top_logprobs: share of requests asking for the tier's maximal top-k | 0.25 | share 1.0 |
| logprobs: share of requests asking for logprobs at all | 0.05 | share 1.0 |
| regular_timing: clockwork request timing (1 − CV of gaps, ≥ 20 requests) | 0.15 | 1.0 |
| novelty: share of requests that are new, once past 100 requests | 0.10 | 0.7 → 0.98 |
| logit_bias: share of requests using logit_bias | 0.10 | share 1.0 |
| campaign: many keys share the client's fingerprint and together collect much distinct
  data (× 0.5–1 by their max-top-k share) | 0.40 | members 5 → 20, distinct 100 → 1,000 |

(*) the tier's ``detection.distinct_prompts`` ramp. Shares are the profile's decayed
shares, bias-corrected for young clients (:meth:`ClientProfile.share`), so a key's first
requests count fully.

Collected volume alone (distinct prompts plus novelty, 0.55) passes the default ``decoy``
threshold (0.45): a key that keeps asking new questions under the static limits, with no
logprobs and human-like timing, still ends up collecting decoys, from about 1,000 distinct
prompts at the default ramp. A tier whose honest clients legitimately send more distinct
prompts than that (a batch tier) sets a wider ``detection.distinct_prompts`` ramp.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard_server.detection.profile import CampaignProfile, ClientProfile

ACTIONS = ("pass", "tighten", "perturb", "decoy", "block")
DISTINCT_RAMP = (400, 1200)
"""Distinct prompts at which ``distinct_prompts`` starts to count, and at which it is full."""


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

    def signals(self) -> dict[str, float]:
        """The contributions rounded for people (audit log, admin API)."""
        return {name: round(value, 4) for name, value in self.contributions.items()}


def contributions(
    profile: ClientProfile,
    campaign: CampaignProfile | None,
    distinct_ramp: tuple[int, int] = DISTINCT_RAMP,
) -> dict[str, float]:
    """Each signal's share of the score (see the module table)."""
    parts = {
        "distinct_prompts": 0.45 * _ramp(profile.distinct_prompts, *distinct_ramp),
        "max_top_logprobs": 0.25 * profile.share(profile.max_top_share),
        "logprobs": 0.05 * profile.share(profile.logprob_share),
        "regular_timing": 0.15 * profile.regularity,
        "novelty": 0.10 * _ramp(profile.novelty, 0.7, 0.98) if profile.total >= 100 else 0.0,
        "logit_bias": 0.10 * profile.share(profile.logit_bias_share),
        "campaign": 0.0,
    }
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
) -> Assessment:
    """Score a client and map the score to the highest action whose threshold it reaches."""
    parts = contributions(profile, campaign, distinct_ramp)
    parts = {name: value for name, value in parts.items() if value}
    score = min(1.0, sum(parts.values()))
    action = "pass"
    for name in ACTIONS[1:]:
        if score >= thresholds[name]:
            action = name
    return Assessment(round(score, 4), parts, action)
