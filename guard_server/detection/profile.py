"""Per-client and per-fingerprint profiles: what the state store keeps and hands back.

Memory per client is bounded: a few decayed counters plus one HyperLogLog per time bucket
of the sliding windows (Redis's own, in both stores: ``detection.sketches``). Volume signals
(distinct prompts, requests) count only the window, so a client's past stops counting
against it: nothing is counted forever.
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


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window of ``buckets`` time buckets of ``bucket_s`` seconds (the current,
    partial bucket included: the window spans between ``buckets - 1`` and ``buckets``
    bucket lengths)."""

    name: str
    bucket_s: float
    buckets: int

    def bucket_of(self, now: float) -> int:
        """The index of the bucket ``now`` falls in."""
        return int(now // self.bucket_s)

    def bucket_range(self, now: float) -> range:
        """The indices of the window's buckets at ``now``, oldest first."""
        current = self.bucket_of(now)
        return range(current - self.buckets + 1, current + 1)

    def expires_in_s(self, now: float) -> float:
        """Seconds until the current bucket leaves the window."""
        return (self.bucket_of(now) + self.buckets) * self.bucket_s - now


DAY = Window("day", 4 * 3600.0, 6)
"""The short window: six 4-hour buckets (the last 20 to 24 hours)."""
WEEK = Window("week", 24 * 3600.0, 7)
"""The long window: seven daily buckets (the last 6 to 7 days)."""


# Profiles and assessments are built on every request: plain slotted dataclasses, since a
# frozen one's __init__ costs about four times as much. Treat them as read-only.


@dataclass(slots=True)
class ClientProfile:
    """What is known about one client's traffic."""

    requests: float  # decayed count (half-life HALF_LIFE_S)
    total: int  # all requests observed while the profile lived (gates young-key signals)
    distinct_prompts: int  # distinct prompt identities in the DAY window
    distinct_week: int  # ... in the WEEK window
    window_requests: int  # prompts asked in the DAY window (repeats included)
    logprob_share: float
    max_top_share: float
    logit_bias_share: float
    gap_mean_s: float
    gap_var_s2: float
    fingerprint: str
    templated_share: float = 0.0  # decayed share of requests with the previous fingerprint
    age_s: float = 0.0  # since the client's first request (while its profile lived)
    end_users: int = 0  # distinct end users (safety_identifier / user) named in the DAY window

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
        """The share of the DAY window's requests that asked something new."""
        if not self.window_requests:
            return 0.0
        return min(1.0, self.distinct_prompts / self.window_requests)


@dataclass(slots=True)
class CampaignProfile:
    """What is known about every client sharing one request fingerprint (members and
    prompts in the DAY window)."""

    members: int
    distinct_prompts: int
    max_top_share: float
