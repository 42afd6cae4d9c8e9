"""Schemathesis against a real guard process: zero 5xx, every error OpenAI-shaped, every
answer as the OpenAPI document says (guard_server.openapi).

The guard runs in front of the fast fake upstream (benchmarks.fake_upstream) by default;
``GUARD_FUZZ_TARGET=vllm`` puts it in front of real vLLM (``GUARD_TEST_VLLM_URL``, or one the
suite starts). ``GUARD_FUZZ_EXAMPLES`` sets Hypothesis' examples per operation and mode (the
suite's short run: 150). Requests rotate over three clients: the default tier in shadow
detection, the trusted tier, and the default tier enforcing (so risk actions fire too).
The tally of answers is printed at the end and written to ``GUARD_FUZZ_REPORT`` when set;
the guard's audit log (prompts included) is left in the session's ``fuzz-guard`` folder.
RELIABILITY.md ("Fuzzing") has the long runs' commands and figures.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from benchmarks.procs import fake_upstream
from guard_server.openapi import openapi_document, openapi_json
from guard_server.teacher import SERVED_MODEL_NAME
from guard_server.testing import DEMO_KEY, TEST_POLICIES, TRUSTED_KEY, GuardProcess, free_port
from guard_server.testing.config import model_dir_under_test, write_test_config
from guard_server.testing.services import serving_vllm

FUZZ_KEY = "sk-test-fuzz"
FUZZ_CLIENTS = Path(__file__).parents[1] / "data" / "fuzz-clients.yaml"
TARGET = os.environ.get("GUARD_FUZZ_TARGET", "fake")
EXAMPLES = int(os.environ.get("GUARD_FUZZ_EXAMPLES", "150"))
# A generation on CPU vLLM takes seconds; the fake upstream answers in a millisecond.
REQUEST_TIMEOUT_S = 120.0 if TARGET == "vllm" else 30.0

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "suppress-health-check": ["all"],
    }
)
SCHEMA = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]
_KEYS = itertools.cycle([FUZZ_KEY, TRUSTED_KEY, DEMO_KEY])
_KEYS_LOCK = threading.Lock()
TALLY: Counter[str] = Counter()
_MODEL_DRAWS = itertools.cycle([True] * 9 + [False])


@pytest.fixture(scope="module")
def upstream_url(artifacts: Path) -> Iterator[str]:
    """The fake upstream, or real vLLM with ``GUARD_FUZZ_TARGET=vllm``."""
    if TARGET == "vllm":
        log = artifacts / "vllm.log"
        with serving_vllm(model_dir_under_test(), log, "GUARD_TEST_VLLM_URL") as url:
            yield url
        return
    port = free_port()
    process = fake_upstream(port, artifacts / "fuzz-fake-upstream.log", None)
    process.spawn()
    try:
        process.wait_http(f"http://127.0.0.1:{port}/health", 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def fuzz_guard(upstream_url: str, artifacts: Path) -> Iterator[GuardProcess]:
    """A guard in front of the upstream, with the suite's policies and the fuzz client."""
    directory = artifacts / "fuzz-guard"
    directory.mkdir(exist_ok=True)
    config = write_test_config(
        directory,
        [upstream_url],
        policies=[*TEST_POLICIES, FUZZ_CLIENTS],
        audit={"path": str(directory / "audit.jsonl"), "include_prompts": True},
    )
    with GuardProcess(config, directory / "guard.log") as guard:
        yield guard
    _report()


def _report() -> None:
    summary = {"target": TARGET, "examples": EXAMPLES, "requests": sum(TALLY.values()),
               "answers": dict(sorted(TALLY.items()))}  # fmt: skip
    print("\nfuzz tally:", json.dumps(summary))
    if path := os.environ.get("GUARD_FUZZ_REPORT"):
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def _next_key() -> str:
    with _KEYS_LOCK:
        return next(_KEYS)


def _mostly_the_served_model(case: schemathesis.Case) -> None:
    """Name the served model in nine generated bodies of ten: a random name is a 404 at the
    first stage, and the fuzz is meant to reach the upstream and back. A ``model`` that is not
    a string is left as generated (a negative case)."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and next(_MODEL_DRAWS):
        body["model"] = SERVED_MODEL_NAME


def _check_error_shape(response: requests.Response) -> None:
    """Any status ≥ 400, documented or not: an OpenAI error object, nothing else."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str), body
    assert "Traceback" not in error["message"], body


def _check_event_stream(response: requests.Response) -> None:
    """A 200 stream: JSON events (chunks or OpenAI error events), then ``data: [DONE]``."""
    events = [event for event in response.text.split("\n\n") if event.strip()]
    assert events and events[-1] == "data: [DONE]", response.text[-500:]
    for event in events[:-1]:
        assert event.startswith("data: "), event
        data: dict[str, Any] = json.loads(event[6:])
        if "error" in data:
            error = data["error"]
            assert set(error) == {"message", "type", "param", "code"}, data
            assert isinstance(error["code"], int) and error["code"] >= 400, data
            assert error["code"] < 500 or error["type"] == "upstream_error", data
            continue
        assert data["object"] in ("chat.completion.chunk", "text_completion"), data
        assert isinstance(data["choices"], list), data


def test_the_guard_serves_the_document(fuzz_guard: GuardProcess) -> None:
    served = requests.get(fuzz_guard.url + "/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.content == openapi_json()


@SCHEMA.parametrize()
def test_the_guard_answers_every_generated_request_well(
    case: schemathesis.Case, fuzz_guard: GuardProcess
) -> None:
    headers = {"Authorization": f"Bearer {_next_key()}"}
    _mostly_the_served_model(case)
    response = case.call(base_url=fuzz_guard.url, headers=headers, timeout=REQUEST_TIMEOUT_S)
    TALLY[str(response.status_code)] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)
    if response.status_code >= 400:
        _check_error_shape(response)
    elif response.headers.get("Content-Type", "").startswith("text/event-stream"):
        _check_event_stream(response)
