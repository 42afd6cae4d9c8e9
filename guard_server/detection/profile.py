"""Per-client and per-fingerprint profiles: what the state store keeps and hands back.

Memory per client is bounded: a few decayed counters plus a fixed-size distinct-count
sketch (a HyperLogLog in Redis, a k-minimum-values sketch in process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How fast the shares and timing statistics forget (per request), and the request-count
# half-life. Both backends use exactly these.
SHARE_ALPHA = 0.02
GAP_ALPHA = 0.05
HALF_LIFE_S = 24 * 3600.0
IDLE_TTL_S = 7 * 24 * 3600.0


# Profiles and assessments are built on every request: plain slotted dataclasses, since a
# frozen one's __init__ costs about four times as much. Treat them as read-only.


@dataclass(slots=True)
class ClientProfile:
    """What is known about one client's traffic."""

    requests: float  # decayed count (half-life HALF_LIFE_S)
    total: int  # all requests ever observed
    distinct_prompts: int
    logprob_share: float
    max_top_share: float
    logit_bias_share: float
    gap_mean_s: float
    gap_var_s2: float
    fingerprint: str

    @property
    def regularity(self) -> float:
        """1 for clockwork timing, 0 for Poisson-like or burstier (1 − coefficient of variation)."""
        if self.total < 20 or self.gap_mean_s <= 0:
            return 0.0
        cv = math.sqrt(max(self.gap_var_s2, 0.0)) / self.gap_mean_s
        return max(0.0, 1.0 - cv)

    def share(self, ema: float) -> float:
        """A bias-corrected share from one of the decayed shares (``logprob_share``, ...).

        The shares are exponential moving averages that start at 0, so after ``n`` requests
        they are scaled by ``1 - (1 - SHARE_ALPHA)**n``: a new key whose every request asked
        for logprobs would otherwise look like one that rarely does. Dividing that factor out
        (as Adam does for its moments) gives the share of the requests seen so far while
        the key is young, and the decayed share once it has history.
        """
        if self.total <= 0:
            return 0.0
        return min(1.0, ema / (1.0 - (1.0 - SHARE_ALPHA) ** self.total))

    @property
    def novelty(self) -> float:
        """The share of requests that asked something new."""
        return min(1.0, self.distinct_prompts / self.total) if self.total else 0.0


@dataclass(slots=True)
class CampaignProfile:
    """What is known about every client sharing one request fingerprint."""

    members: int
    distinct_prompts: int
    max_top_share: float
