"""Every response names its request (``x-request-id``, the SDK's ``_request_id``); vLLM, the
logs and the audit log get the same id, and a W3C trace id where the caller sent one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from guard_server.correlation import correlate, trace_id_of
from guard_server.teacher.task import make_problems
from guard_server.testing import DEMO_KEY, GuardProcess, write_test_config

PROBLEM = make_problems(1, seed=5, split="heldout")[0]
CHAT = [{"role": "user", "content": PROBLEM.question}]
GENERATED = re.compile(r"req_[0-9a-f]{32}")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_the_sdk_sees_a_request_id_that_vllm_used_too(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="teacher", messages=CHAT)
    completion = raw.parse()
    assert GENERATED.fullmatch(completion._request_id or "")
    assert raw.headers["x-request-id"] == completion._request_id
    # vLLM names its request (and so the answer) after the X-Request-Id the guard sent
    assert completion.id == f"chatcmpl-{completion._request_id}"


def test_a_client_request_id_is_kept_end_to_end(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="teacher", prompt="hi", max_tokens=2, extra_headers={"x-request-id": "job-7.item:42"}
    )
    assert completion._request_id == "job-7.item:42"
    assert completion.id == "cmpl-job-7.item:42"
    # an unusable one (spaces, too long) is replaced, never echoed
    for offered in ("two words", "x" * 129):
        other = client.completions.create(
            model="teacher", prompt="hi", max_tokens=2, extra_headers={"x-request-id": offered}
        )
        assert GENERATED.fullmatch(other._request_id or "")


def test_streams_and_errors_carry_the_request_id(guard: GuardProcess) -> None:
    sdk = openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
    with sdk.chat.completions.with_streaming_response.create(
        model="teacher", messages=CHAT, stream=True, extra_headers={"x-request-id": "stream-1"}
    ) as response:
        assert response.headers["x-request-id"] == "stream-1"
        chunks = list(response.parse())
    assert chunks and all(chunk.id == "chatcmpl-stream-1" for chunk in chunks)
    errors = [
        (openai.AuthenticationError, {"api_key": "sk-wrong"}, {}),
        (openai.NotFoundError, {}, {"model": "no-such-model"}),
        (openai.BadRequestError, {}, {"temperature": 9}),
    ]
    for kind, client_options, fields in errors:
        bad = openai.OpenAI(
            base_url=guard.base_url, **{"api_key": DEMO_KEY, **client_options}, max_retries=0
        )
        with pytest.raises(kind) as caught:
            bad.chat.completions.create(
                **{"model": "teacher", "messages": CHAT, **fields},
                extra_headers={"x-request-id": f"err-{kind.__name__}"},
            )
        assert caught.value.request_id == f"err-{kind.__name__}"
    # outside the API as well: unknown routes, probes
    for path in ("/v1/nowhere", "/healthz"):
        response = httpx.get(guard.url + path)
        assert GENERATED.fullmatch(response.headers["x-request-id"])


def test_logs_and_audit_name_the_request_and_its_trace(tmp_path: Path, vllm_url: str) -> None:
    config = write_test_config(
        tmp_path,
        [vllm_url],
        audit={"path": "audit.jsonl"},
        logging={"format": "json", "access_log": True},
    )
    guard = GuardProcess(config, tmp_path / "guard.log").start()
    try:
        guard.wait_ready()
        sdk = openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
        headers = {"x-request-id": "audited-1", "traceparent": TRACEPARENT}
        sdk.chat.completions.create(model="teacher", messages=CHAT, extra_headers=headers)
    finally:
        guard.stop()
    (record,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert (record["request_id"], record["trace_id"]) == ("audited-1", TRACE_ID)
    lines = [json.loads(line) for line in guard.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    (access,) = [line for line in lines if line.get("path") == "/v1/chat/completions"]
    assert (access["logger"], access["status"]) == ("guard_server.access", 200)
    assert access["request_id"] == "audited-1"


def test_only_a_valid_traceparent_is_forwarded() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    def headers(**values: str) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))

    assert trace_id_of(TRACEPARENT) == TRACE_ID
    # a later version may append fields; version ff, zero ids, and junk are invalid
    assert trace_id_of(f"01-{TRACE_ID}-00f067aa0ba902b7-01-more") == TRACE_ID
    for bad in (
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",
        "not a traceparent",
    ):
        assert trace_id_of(bad) is None, bad
    forwarded = correlate(headers(traceparent=TRACEPARENT, tracestate="vendor=1"))
    assert forwarded.upstream_headers() == {
        "X-Request-Id": forwarded.request_id,
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=1",
    }
    # a broken traceparent takes its tracestate with it; a tracing guard forwards neither
    broken = correlate(headers(traceparent="00-junk", tracestate="vendor=1"))
    assert broken.upstream_headers() == {"X-Request-Id": broken.request_id}
    tracing = correlate(headers(traceparent=TRACEPARENT), forward_trace=False)
    assert tracing.trace_id == TRACE_ID and "traceparent" not in tracing.upstream_headers()
