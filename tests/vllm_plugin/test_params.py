"""The vllm_xargs contract: which guard keys are read, their defaults and their validation."""

from __future__ import annotations

import pytest

from guard_server.vllm_plugin.params import KNOWN_KEYS, GuardParams, parse


def test_requests_without_guard_keys_have_no_params() -> None:
    assert parse(None) is None
    assert parse({}) is None
    assert parse({"target_token": 5, "kv_transfer_params": {}}) is None


def test_defaults_and_enabling_switches() -> None:
    params = parse({"guard_wm_key": 7})
    assert params == GuardParams(wm_key=7, wm_gamma=0.25, wm_delta=2.0)
    assert params.watermark and not params.noise and not params.bounds and params.active
    noisy = parse({"guard_noise_seed": 3, "guard_noise_sigma": 1})
    assert noisy.noise and noisy.noise_kind == "gumbel" and noisy.noise_sigma == 1.0
    assert not parse({"guard_noise_seed": 3}).active
    assert not parse({"guard_top_k": 0, "guard_top_p": 1.0, "guard_min_p": 0}).active
    assert parse({"guard_top_k": -1}).top_k == 0
    assert parse({"guard_top_k": 20}).bounds
    assert not parse({"guard_wm_key": 1, "guard_wm_delta": 0}).active


def test_full_contract_parses() -> None:
    args = {
        "guard_noise_seed": (1 << 31) - 1,
        "guard_noise_sigma": 0.5,
        "guard_noise_kind": "gaussian",
        "guard_top_k": 40,
        "guard_top_p": 0.9,
        "guard_min_p": 0.05,
        "guard_wm_key": 0,
        "guard_wm_gamma": 0.5,
        "guard_wm_delta": 1.5,
        "unrelated": "ignored",
    }
    assert set(args) - {"unrelated"} == KNOWN_KEYS
    assert parse(args) == GuardParams(
        noise_seed=(1 << 31) - 1,
        noise_sigma=0.5,
        noise_kind="gaussian",
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        wm_key=0,
        wm_gamma=0.5,
        wm_delta=1.5,
    )


@pytest.mark.parametrize(
    "args",
    [
        {"guard_noise_sigma": 1.0},  # no seed
        {"guard_noise_seed": 1 << 31, "guard_noise_sigma": 1.0},
        {"guard_noise_seed": -1, "guard_noise_sigma": 1.0},
        {"guard_noise_seed": 1.5, "guard_noise_sigma": 1.0},
        {"guard_noise_seed": True, "guard_noise_sigma": 1.0},
        {"guard_noise_seed": 1, "guard_noise_sigma": -1.0},
        {"guard_noise_seed": 1, "guard_noise_sigma": float("nan")},
        {"guard_noise_seed": 1, "guard_noise_sigma": 1.0, "guard_noise_kind": "uniform"},
        {"guard_top_k": -2},
        {"guard_top_k": "5"},
        {"guard_top_p": 0.0},
        {"guard_top_p": 1.5},
        {"guard_min_p": -0.1},
        {"guard_wm_key": 1, "guard_wm_gamma": 1.0},
        {"guard_wm_key": 1, "guard_wm_gamma": 0.0},
        {"guard_wm_key": 1, "guard_wm_delta": -1.0},
        {"guard_wm_key": "abc"},
        {"guard_wm_kye": 1},  # a typo must not silently drop the watermark
    ],
)
def test_invalid_values_are_rejected(args: dict) -> None:
    with pytest.raises(ValueError):
        parse(args)
