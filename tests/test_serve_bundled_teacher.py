"""README command (a): `serve` with no upstream runs the bundled teacher on real vLLM."""

from __future__ import annotations

import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import yaml

from guard_server.teacher.task import check, make_problems
from guard_server.testing import DEMO_KEY, POLICIES, GuardProcess, free_port


def _start_serve(tmp_path: Path) -> tuple[GuardProcess, int, str]:
    vllm_port = free_port()
    config = yaml.safe_load((POLICIES / "guard.yaml").read_text())
    config["policies"] = [str(POLICIES / name) for name in config["policies"]]
    config["bundled_teacher"] = {"port": vllm_port}
    config["metrics"] = {"port": free_port()}
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


def test_serve_runs_the_teacher_prints_a_working_example_and_stops_it(tmp_path: Path) -> None:
    process, vllm_port, banner = _start_serve(tmp_path)
    try:
        base_url = re.search(r"listening on (http://\S+/v1)", banner).group(1)  # type: ignore[union-attr]
        question = re.search(r'"content": (\'[^\']*\'|"[^"]*")', banner).group(1)[1:-1]  # type: ignore[union-attr]
        assert _answers(vllm_port)
        reply = openai.OpenAI(
            base_url=base_url, api_key=DEMO_KEY, max_retries=0
        ).chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": question}], temperature=0
        )
        problem = next(
            p for p in make_problems(1, seed=7, split="heldout") if p.question == question
        )
        assert check(problem, reply.choices[0].message.content or "")
        # A crash of the guard (SIGKILL: no cleanup code runs) still takes vLLM down.
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        _wait_until_down(vllm_port)
    finally:
        process.stop()


def test_sigterm_stops_guard_and_vllm(tmp_path: Path) -> None:
    process, vllm_port, _ = _start_serve(tmp_path)
    try:
        assert _answers(vllm_port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        _wait_until_down(vllm_port, timeout_s=10)
    finally:
        process.stop()
