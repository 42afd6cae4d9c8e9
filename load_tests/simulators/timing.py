"""Request pacing in simulated seconds: Poisson arrivals, bursty sessions, clockwork scripts."""

from __future__ import annotations

import random


def poisson_arrivals(
    rng: random.Random, rate_per_s: float, start_s: float, end_s: float
) -> list[float]:
    """Arrival times of a Poisson process with ``rate_per_s`` on ``[start_s, end_s)``."""
    times: list[float] = []
    t = start_s
    while rate_per_s > 0:
        t += rng.expovariate(rate_per_s)
        if t >= end_s:
            break
        times.append(t)
    return times


def clockwork(
    rng: random.Random, start_s: float, gap_s: float, count: int, jitter: float
) -> list[float]:
    """``count`` times ``gap_s`` apart, each gap scaled by a uniform ``1 ± jitter`` (a script)."""
    times: list[float] = []
    t = start_s
    for _ in range(count):
        times.append(t)
        t += gap_s * rng.uniform(1 - jitter, 1 + jitter)
    return times


def session_starts(rng: random.Random, count: int, window_s: float) -> list[float]:
    """``count`` session start times over the window, sorted (a user's bursts of activity)."""
    return sorted(rng.uniform(0, window_s) for _ in range(count))


def think_gap(rng: random.Random, mean_s: float) -> float:
    """A pause between two requests of one session: log-normal, so mostly short, sometimes long."""
    return rng.lognormvariate(0.0, 0.8) * mean_s / 1.377


def geometric(rng: random.Random, mean: float) -> int:
    """A count ≥ 1 with the given mean (geometric distribution)."""
    p = 1.0 / max(mean, 1.0)
    n = 1
    while rng.random() > p:
        n += 1
    return n


def poisson_count(rng: random.Random, mean: float) -> int:
    """A Poisson-distributed count with the given mean (Knuth's method; small means)."""
    limit, k, p = pow(2.718281828459045, -mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k
