"""OpenTelemetry (the ``otel`` extra): a server span per /v1 request continuing the caller's
trace, a client span for its upstream call, exported over OTLP/HTTP to a collector."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import yaml

import guard_server.otel as otel
from guard_server.config.loader import ConfigError, load_settings
from guard_server.testing import DEMO_KEY, GuardProcess, write_test_config
from tests.otlp import CLIENT, SERVER, OtlpReceiver

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


def test_spans_of_the_guard_and_its_upstream_call_join_the_callers_trace(
    tmp_path: Path, vllm_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    with OtlpReceiver() as receiver:
        config = write_test_config(
            tmp_path,
            [vllm_url],
            tracing={"otel": True, "service_name": "guard-test", "otlp_endpoint": receiver.url},
            audit={"path": "audit.jsonl"},
        )
        guard = GuardProcess(config, tmp_path / "guard.log").start()
        try:
            guard.wait_ready()
            sdk = openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0)
            traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
            sdk.chat.completions.create(
                model="teacher", messages=CHAT, extra_headers={"traceparent": traceparent}
            )
            untraced = sdk.chat.completions.create(model="teacher", messages=CHAT)
            (server,) = receiver.wait_for(1, kind=SERVER, trace_id=TRACE_ID)
            (client,) = receiver.wait_for(1, kind=CLIENT, trace_id=TRACE_ID)
            (root,) = receiver.wait_for(1, kind=SERVER, parent_id="")
        finally:
            guard.stop()
    assert server.service == client.service == "guard-test"
    assert server.parent_id == CALLER_SPAN  # continues the caller's span
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.status_code"] == 200
    assert client.parent_id == server.span_id  # the upstream call, inside the request
    assert client.attributes["http.url"] == f"{vllm_url}/v1/chat/completions"
    # without a traceparent the guard starts the trace; probes and scrapes make no spans
    assert root.trace_id != TRACE_ID
    assert {span.kind for span in receiver.spans} == {SERVER, CLIENT}
    assert len(receiver.spans) == 4
    # the audit log names each request's trace
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["trace_id"] for line in audit] == [TRACE_ID, root.trace_id]
    assert audit[1]["request_id"] == untraced._request_id


def test_tracing_without_the_extra_is_a_clear_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump({"tracing": {"otel": True}}))
    assert load_settings(path).config.tracing.otel  # the extra is installed here
    monkeypatch.setattr(otel, "_REQUIRED", ("opentelemetry.no_such_module",))
    with pytest.raises(ConfigError, match=r"pip install 'guard-server\[otel\]'"):
        load_settings(path)
