"""The guard's per-request contract: which ``SamplingParams.extra_args`` keys the plugin reads.

The guard sets these keys in the request's ``vllm_xargs`` (vLLM copies them to
``SamplingParams.extra_args``); clients can never set them, the guard strips theirs.

=====================  =====================================  ======================================
key                    value                                  effect
=====================  =====================================  ======================================
``guard_noise_seed``   int in [0, 2**31)                      key of the per-request logit noise
``guard_noise_sigma``  float >= 0 (> 0 enables noise)         noise scale, in logits
``guard_noise_kind``   ``"gumbel"`` (default), ``"gaussian"``  noise distribution
``guard_top_k``        int >= 0 (0 or -1: off)                keep at most k tokens
``guard_top_p``        float in (0, 1] (1: off)               keep the smallest nucleus of mass p
``guard_min_p``        float in [0, 1] (0: off)               drop tokens below min_p * max prob
``guard_wm_key``       int in [0, 2**31) (present: enables)   per-client KGW watermark key
``guard_wm_gamma``     float in (0, 1), default 0.25          green-list fraction
``guard_wm_delta``     float >= 0, default 2.0                logit bonus of green tokens
=====================  =====================================  ======================================

Any other key starting with ``guard_`` is rejected, so that a typo in the guard fails loudly
instead of silently dropping a defence. Keys without the prefix are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "guard_"
MAX_KEY = 1 << 31
NOISE_KINDS = ("gumbel", "gaussian")
KNOWN_KEYS = frozenset(
    {
        "guard_noise_seed",
        "guard_noise_sigma",
        "guard_noise_kind",
        "guard_top_k",
        "guard_top_p",
        "guard_min_p",
        "guard_wm_key",
        "guard_wm_gamma",
        "guard_wm_delta",
    }
)


@dataclass(frozen=True, slots=True)
class GuardParams:
    """One request's guard settings, validated; each defence is off at its neutral value."""

    noise_seed: int = 0
    noise_sigma: float = 0.0
    noise_kind: Literal["gumbel", "gaussian"] = "gumbel"
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    wm_key: int | None = None
    wm_gamma: float = 0.25
    wm_delta: float = 2.0

    @property
    def noise(self) -> bool:
        """Whether keyed noise is added."""
        return self.noise_sigma > 0.0

    @property
    def watermark(self) -> bool:
        """Whether the green-list watermark is applied."""
        return self.wm_key is not None and self.wm_delta > 0.0

    @property
    def bounds(self) -> bool:
        """Whether any sampling bound (top-k, top-p, min-p) is forced."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def active(self) -> bool:
        """Whether the plugin changes this request's logits at all."""
        return self.noise or self.watermark or self.bounds


def _int(args: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def _float(args: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def parse(extra_args: Mapping[str, Any] | None) -> GuardParams | None:
    """The request's ``GuardParams``, or None when it has no guard key; ValueError if invalid."""
    if not extra_args:
        return None
    names = {name for name in extra_args if name.startswith(PREFIX)}
    if not names:
        return None
    unknown = sorted(names - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown guard parameter(s) in vllm_xargs: {', '.join(unknown)}")

    seed = _int(extra_args, "guard_noise_seed", 0, MAX_KEY)
    sigma = _float(extra_args, "guard_noise_sigma", 0.0, 1e4) or 0.0
    kind = extra_args.get("guard_noise_kind", "gumbel")
    if kind not in NOISE_KINDS:
        raise ValueError(f"guard_noise_kind must be one of {NOISE_KINDS}, got {kind!r}")
    if sigma > 0.0 and seed is None:
        raise ValueError("guard_noise_sigma > 0 needs guard_noise_seed")

    top_k = _int(extra_args, "guard_top_k", -1, 1 << 31)
    top_p = _float(extra_args, "guard_top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise ValueError("guard_top_p must be in (0, 1], got 0.0")
    min_p = _float(extra_args, "guard_min_p", 0.0, 1.0)

    wm_key = _int(extra_args, "guard_wm_key", 0, MAX_KEY)
    gamma = _float(extra_args, "guard_wm_gamma", 0.0, 1.0)
    if gamma is not None and not 0.0 < gamma < 1.0:
        raise ValueError(f"guard_wm_gamma must be in (0, 1), got {gamma}")
    delta = _float(extra_args, "guard_wm_delta", 0.0, 100.0)

    return GuardParams(
        noise_seed=seed or 0,
        noise_sigma=sigma,
        noise_kind=kind,
        top_k=max(top_k or 0, 0),
        top_p=1.0 if top_p is None else top_p,
        min_p=min_p or 0.0,
        wm_key=wm_key,
        wm_gamma=0.25 if gamma is None else gamma,
        wm_delta=2.0 if delta is None else delta,
    )
