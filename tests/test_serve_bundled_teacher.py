"""README command (a): `serve` with no upstream runs the bundled teacher on real vLLM."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from guard_server.teacher.task import check, make_problems
from guard_server.testing import DEMO_KEY, POLICIES, GuardProcess, free_port, write_test_config
from tests.otlp import CLIENT, SERVER, OtlpReceiver

TRACE_ID = "5b8aa5a2d2c872e8321cf37308d69df2"
SECOND_TRACE_ID = "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f"
CALLER_SPAN = "051581bf3cb55c13"


def _start_serve(tmp_path: Path, **overrides: object) -> tuple[GuardProcess, int, str]:
    vllm_port = free_port()
    config = yaml.safe_load((POLICIES / "guard.yaml").read_text())
    config["policies"] = [str(POLICIES / name) for name in config["policies"]]
    config["bundled_teacher"] = {"port": vllm_port}
    config["metrics"] = {"port": free_port()}
    config.update(overrides)
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump(config))
    process = GuardProcess(path, tmp_path / "guard.log").spawn()
    try:
        output = process.wait_log("curl -s", timeout_s=300)
    except BaseException:
        process.stop()
        raise
    match = re.search(r"listening on (http://\S+/v1)", output)
    assert match, output
    return process, vllm_port, output


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_down(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _answers(port):
        time.sleep(0.5)
    assert not _answers(port), "vLLM outlived the guard"


def _vllm_environment(port: int) -> tuple[str, dict[str, str]]:
    """The command line and environment of the vLLM serving on ``port`` (a process of ours)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"vllm.entrypoints.openai.api_server" in argv and str(port).encode() in argv:
                environ = (proc / "environ").read_bytes().split(b"\0")
                pairs = (item.decode().partition("=") for item in environ if item)
                return " ".join(a.decode() for a in argv), {k: v for k, _, v in pairs}
        except OSError:
            continue
    raise AssertionError(f"no vLLM on port {port}")


def test_serve_runs_the_teacher_prints_a_working_example_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # spans exported within 0.1 s
    with OtlpReceiver() as receiver:
        tracing = {"otel": True, "otlp_endpoint": receiver.url}
        process, vllm_port, banner = _start_serve(tmp_path, tracing=tracing)
        try:
            base_url = re.search(r"listening on (http://\S+/v1)", banner).group(1)  # type: ignore[union-attr]
            question = re.search(r'"content": (\'[^\']*\'|"[^"]*")', banner).group(1)[1:-1]  # type: ignore[union-attr]
            assert _answers(vllm_port)
            sdk = openai.OpenAI(base_url=base_url, api_key=DEMO_KEY, max_retries=0)
            traced = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
            raw = sdk.chat.completions.with_raw_response.create(
                model="teacher", messages=[{"role": "user", "content": question}],
                temperature=0, extra_headers=traced,
            )  # fmt: skip
            reply = raw.parse()
            problem = next(
                p for p in make_problems(1, seed=7, split="heldout") if p.question == question
            )
            assert check(problem, reply.choices[0].message.content or "")
            _check_one_trace_through_guard_and_vllm(receiver, reply._request_id or "")
            _check_the_managed_vllm_needs_the_guards_key(tmp_path, vllm_port, receiver)
            # A crash of the guard (SIGKILL: no cleanup code runs) still takes vLLM down.
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            _wait_until_down(vllm_port)
        finally:
            process.stop()


def _check_one_trace_through_guard_and_vllm(receiver: OtlpReceiver, request_id: str) -> None:
    """The caller's trace runs through the guard's request span, its upstream call and
    vLLM's own span of the request (vLLM exports to the guard's collector)."""
    (server,) = receiver.wait_for(1, kind=SERVER, service="guard-server", trace_id=TRACE_ID)
    (client,) = receiver.wait_for(1, kind=CLIENT, service="guard-server", trace_id=TRACE_ID)
    (vllm,) = receiver.wait_for(1, name="llm_request", trace_id=TRACE_ID)
    assert server.parent_id == CALLER_SPAN
    assert client.parent_id == server.span_id
    assert vllm.parent_id == client.span_id
    assert vllm.attributes["gen_ai.request.id"] == f"chatcmpl-{request_id}"


def _check_the_managed_vllm_needs_the_guards_key(
    tmp_path: Path, vllm_port: int, receiver: OtlpReceiver
) -> None:
    """Another local process cannot skip the guard: vLLM wants a key that only the guard
    (and vLLM's own environment, not its command line) holds; a guard with the wrong key
    answers a clear 502."""
    direct = httpx.get(f"http://127.0.0.1:{vllm_port}/v1/models")
    assert direct.status_code == 401
    command, environment = _vllm_environment(vllm_port)
    key = environment["VLLM_API_KEY"]
    assert len(key) >= 32 and key not in command and "--api-key" not in command
    # A second guard in front of the same vLLM: `teacher` with the right key (from the
    # environment), `teacher-wrong` with a wrong one (from a file next to its config).
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "wrong.key").write_text("sk-not-the-key\n")
    url = f"http://127.0.0.1:{vllm_port}"
    config = write_test_config(
        tmp_path / "second",
        [url],
        upstreams={
            "teacher": {"urls": [url], "api_key": {"env": "GUARD_TEST_VLLM_KEY"}},
            "teacher-wrong": {
                "urls": [url], "served_model": "teacher", "api_key": {"file": "wrong.key"},
            },
        },
    )  # fmt: skip
    os.environ["GUARD_TEST_VLLM_KEY"] = key
    try:
        guard = GuardProcess(config, tmp_path / "second" / "guard.log").start()
    finally:
        del os.environ["GUARD_TEST_VLLM_KEY"]
    try:
        sdk = openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
        caller_span = "a1b2c3d4e5f60718"
        reply = sdk.completions.create(
            model="teacher", prompt="hi", max_tokens=2,
            extra_headers={"traceparent": f"00-{SECOND_TRACE_ID}-{caller_span}-01"},
        )  # fmt: skip
        assert reply.usage and reply.usage.completion_tokens > 0
        # this guard does not trace: the caller's traceparent reaches vLLM unchanged
        (vllm,) = receiver.wait_for(1, name="llm_request", trace_id=SECOND_TRACE_ID)
        assert vllm.parent_id == caller_span
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                sdk.completions.create(
                    model="teacher-wrong", prompt="hi", max_tokens=2, stream=stream
                )
            assert caught.value.status_code == 502
            assert caught.value.code == "upstream_auth_failed"  # type: ignore[attr-defined]
            assert "credentials" in caught.value.message
    finally:
        guard.stop()
    log = guard.log()
    assert "refused the guard's API key" in log
    assert key not in log and "sk-not-the-key" not in log


def test_sigterm_stops_guard_and_vllm(tmp_path: Path) -> None:
    process, vllm_port, _ = _start_serve(tmp_path)
    try:
        assert _answers(vllm_port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        _wait_until_down(vllm_port, timeout_s=10)
    finally:
        process.stop()
