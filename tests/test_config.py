"""Config validation names the file, field and value; reloads never drop the good config."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml

from guard_server.config.loader import ConfigError, load_settings
from guard_server.pipeline.audit import worker_audit_path
from guard_server.pipeline.auth import hash_key
from guard_server.testing import (
    DEMO_KEY,
    POLICIES,
    GuardProcess,
    metric_value,
    write_test_config,
)


def _config(tmp_path: Path, policy: dict) -> Path:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump({"policies": ["policy.yaml"]}))
    return path


def _tier(**fields: object) -> dict:
    return {"tiers": {"default": {"allow_fields": ["@openai"], **fields}}}


def test_the_shipped_config_is_valid() -> None:
    settings = load_settings(POLICIES / "guard.yaml")
    assert set(settings.tiers) == {"default", "application", "trusted"}
    assert settings.model_names == ["teacher"]
    # Scoring end users is opt-in: `application` is `default` with it on, nothing else.
    default, application = settings.tiers["default"], settings.tiers["application"]
    assert not default.detection.end_users.enabled and application.detection.end_users.enabled
    detection = application.detection.model_copy(update={"end_users": default.detection.end_users})
    assert dataclasses.replace(application, name="default", detection=detection) == default


def test_relative_paths_are_resolved_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "secret.txt").write_text("s" * 40)
    (folder / "policy.yaml").write_text(yaml.safe_dump(_tier()))
    (folder / "vllm.key").write_text("sk-vllm-key\n")
    (folder / "redis.password").write_text("redis-password")
    config = {
        "policies": ["policy.yaml"],
        "secret": {"file": "secret.txt"},
        "audit": {"path": "logs/audit.jsonl"},
        "upstreams": {"m": {"urls": ["http://vllm:8000"], "api_key": {"file": "vllm.key"}}},
        "state": {"redis_password": {"file": "redis.password"}},
    }
    (folder / "guard.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    settings = load_settings("etc/guard.yaml")
    assert settings.config.audit.path == str(folder / "logs" / "audit.jsonl")
    assert settings.secret == b"s" * 40
    assert settings.upstream_api_keys == {"m": "sk-vllm-key"}
    assert settings.redis_password == "redis-password"
    assert "sk-vllm-key" not in repr(settings) and "redis-password" not in repr(settings)
    assert worker_audit_path(settings.config.audit.path, 1) == str(
        folder / "logs" / "audit.w1.jsonl"
    )
    (folder / "guard.yaml").write_text(yaml.safe_dump({**config, "audit": {"path": "-"}}))
    assert load_settings("etc/guard.yaml").config.audit.path == "-"  # stdout


def test_credentials_come_from_the_environment_and_errors_never_show_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = {"urls": ["http://vllm:8000"], "api_key": {"env": "GUARD_TEST_KEY"}}
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"m": upstream}}))
    monkeypatch.delenv("GUARD_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"upstreams.m.api_key.env: .*GUARD_TEST_KEY is not set"):
        load_settings(path)
    monkeypatch.setenv("GUARD_TEST_KEY", "two words")
    with pytest.raises(ConfigError, match=r"upstreams.m.api_key: the value is empty") as caught:
        load_settings(path)
    assert "two words" not in str(caught.value)
    monkeypatch.setenv("GUARD_TEST_KEY", "sk-from-env")
    assert load_settings(path).upstream_api_keys == {"m": "sk-from-env"}
    both = {**upstream, "api_key": {"env": "GUARD_TEST_KEY", "file": "k"}}
    path.write_text(yaml.safe_dump({"upstreams": {"m": both}}))
    with pytest.raises(ConfigError, match="set exactly one of `env` or `file`"):
        load_settings(path)


def test_bad_field_error_names_file_path_and_value(tmp_path: Path) -> None:
    path = _config(tmp_path, _tier(bounds={"n": {"max": 4, "on_exceed": "clip"}}))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "policy.yaml" in message
    assert "tiers.default.bounds.n.on_exceed" in message
    assert "'clip'" in message
    assert "'clamp' or 'reject'" in message


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (_tier(bounds={"messages": {"max": 1}}), "'messages' cannot be bounded"),
        (_tier(allow_fields=["@openai", "@everything"]), "unknown field group '@everything'"),
        (_tier(allow_fields=["@openai", "vllm_xargs"]), "set by the guard only"),
        (_tier(allow_fields=["@openai", "service_tier"]), "'service_tier' cannot be passed"),
        (_tier(strip_fields=["messages"]), "required fields cannot be stripped: messages"),
        (_tier(strip_fields=["user"]), "user are in both allow_fields and strip_fields"),
        (_tier(bounds={"n": {"min": 5, "max": 2}}), "min (5.0) is greater than max (2.0)"),
        (_tier(colour="blue"), "tiers.default.colour: unknown field"),
        ({"clients": {"a": {"tier": "gold", "keys": [hash_key("k")]}}}, "unknown tier 'gold'"),
        ({"clients": {"a": {"tier": "default", "keys": ["sk-plain"]}}}, "never in plain text"),
        (_tier(models=["gpt-9"]), "unknown model 'gpt-9'"),
        (_tier(logprobs={"noise": {"scale": -1}}), "tiers.default.logprobs.noise.scale"),
        (_tier(logprobs={"quantize": {"mode": "round"}}), "'none', 'grid' or 'rank'"),
        (_tier(logprobs={"max_top": -2}), "tiers.default.logprobs.max_top"),
        (_tier(logprobs={"exact_sampled_above": 0.5}), "greater than 0.5"),
        (
            _tier(logprobs={"exact_sampled_above": 0.9, "quantize": {"mode": "rank"}}),
            "not with `quantize.mode: rank`",
        ),
        (
            _tier(logprobs={"exact_sampled_above": 0.9, "noise": {"normalize": False}}),
            "needs `noise.normalize: true`",
        ),
        (_tier(bounds={"top_logprobs": {"max": 5}}), "'top_logprobs' cannot be bounded"),
        (_tier(seed="random"), "'allow', 'strip' or 'rekey'"),
        (_tier(logit_bias={"mode": "limit", "max_abs": 500}), "tiers.default.logit_bias.max_abs"),
        (
            _tier(detection={"distinct_prompts": {"start": 2000, "full": 1000}}),
            "distinct_prompts: start must be below full",
        ),
        (_tier(embeddings={"noise": -0.1}), "tiers.default.embeddings.noise"),
        (_tier(embeddings={"quantize_bits": 0}), "tiers.default.embeddings.quantize_bits"),
        (_tier(embeddings={"max_inputs": 5000}), "tiers.default.embeddings.max_inputs"),
        (_tier(embeddings={"sigma": 0.1}), "tiers.default.embeddings.sigma: unknown field"),
    ],
)
def test_invalid_policies_are_rejected_clearly(tmp_path: Path, policy: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, policy))
    assert expected in str(caught.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text("server:\n  port: 80\n bad: [\n")
    with pytest.raises(ConfigError, match=r"guard.yaml: invalid YAML at line \d+"):
        load_settings(path)


def test_an_empty_policy_file_is_refused(tmp_path: Path) -> None:
    """A file being rewritten reads empty for a moment: it must not load as "no clients"."""
    path = _config(tmp_path, {})
    (tmp_path / "policy.yaml").write_text("# being rewritten\n")
    with pytest.raises(ConfigError, match=r"policy.yaml: the file is empty"):
        load_settings(path)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "guard_server", "check-config", str(POLICIES / "guard.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = _config(tmp_path, _tier(bounds={"n": {"max": "many"}}))
    failed = subprocess.run(
        [sys.executable, "-m", "guard_server", "check-config", str(bad)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert failed.returncode == 2
    assert "tiers.default.bounds.n.max" in failed.stderr and "'many'" in failed.stderr


def _demo_clients(tmp_path: Path, tier: str) -> Path:
    path = tmp_path / "clients.yaml"
    path.write_text(
        yaml.safe_dump({"clients": {"demo": {"tier": tier, "keys": [hash_key(DEMO_KEY)]}}})
    )
    return path


def _wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_reload_applies_good_changes_and_keeps_serving_on_bad_ones(
    tmp_path: Path, vllm_url: str
) -> None:
    clients = _demo_clients(tmp_path, "default")
    config = write_test_config(
        tmp_path, [vllm_url], policies=[str(POLICIES / "default.yaml"), str(clients)]
    )
    guard = GuardProcess(config, tmp_path / "guard.log").start()
    try:
        sdk = openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)

        def echo_allowed() -> bool:
            try:
                sdk.completions.create(
                    model="teacher", prompt="a", max_tokens=1, extra_body={"echo": True}
                )
            except openai.BadRequestError:
                return False
            return True

        assert not echo_allowed()
        # A valid change is picked up by the file watcher without a restart.
        _demo_clients(tmp_path, "trusted")
        _wait_for(echo_allowed)
        # A broken file is rejected on SIGHUP; the last good config keeps serving.
        clients.write_text("clients: [this is: not valid")
        guard.send_signal(signal.SIGHUP)
        _wait_for(
            lambda: (
                metric_value(guard.metrics(), "guard_config_reloads_total", result="failure") >= 1
            )
        )
        assert echo_allowed()
        assert metric_value(guard.metrics(), "guard_config_reloads_total", result="success") >= 1
        assert "config reload rejected" in guard.log()
    finally:
        guard.stop()


def test_configmap_style_symlink_swap_is_picked_up(tmp_path: Path, vllm_url: str) -> None:
    """Kubernetes updates a mounted ConfigMap by swapping the ``..data`` symlink."""
    mount = tmp_path / "mount"
    mount.mkdir()
    for version, tier in (("v1", "default"), ("v2", "trusted")):
        (mount / version).mkdir()
        _demo_clients(mount / version, tier)
    (mount / "..data").symlink_to("v1")
    (mount / "clients.yaml").symlink_to("..data/clients.yaml")
    config = write_test_config(
        tmp_path, [vllm_url], policies=[str(POLICIES / "default.yaml"), str(mount / "clients.yaml")]
    )
    guard = GuardProcess(config, tmp_path / "guard.log").start()
    try:
        sdk = openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            sdk.completions.create(
                model="teacher", prompt="a", max_tokens=1, extra_body={"echo": True}
            )
        (mount / "..data_tmp").symlink_to("v2")
        (mount / "..data_tmp").rename(mount / "..data")
        _wait_for(
            lambda: (
                metric_value(guard.metrics(), "guard_config_reloads_total", result="success") >= 1
            )
        )
        sdk.completions.create(model="teacher", prompt="a", max_tokens=1, extra_body={"echo": True})
    finally:
        guard.stop()
