"""Red team: a client that opens a stream and never reads it is cut off after
``server.write_timeout_s``; its upstream request is cancelled, and its pool connection and
concurrency slot come back (before, 256 such clients held the whole upstream pool)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import openai
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import POLICIES, GuardProcess, metric_value, write_test_config
from tests.fake_upstream import FaultyUpstream

KEY = "sk-test-slow-reader"
WRITE_TIMEOUT_S = 1.0


def _guard(tmp_path: Path, upstream_url: str) -> GuardProcess:
    # One upstream connection and one concurrent request for the client: if the stalled
    # stream kept either, the next request could not be served.
    clients = tmp_path / "slow-clients.yaml"
    entry = {"tier": "default", "keys": [hash_key(KEY)], "limits": {"concurrent_requests": 1}}
    clients.write_text(yaml.safe_dump({"clients": {"stalled": entry}}))
    upstream = {
        "urls": [upstream_url],
        "timeouts": {"connect": 2, "read": 30, "total": 120},
        "max_connections": 1,
        "health_interval_s": 0.5,
    }
    config = write_test_config(
        tmp_path,
        [upstream_url],
        upstreams={"teacher": upstream},
        server={"write_timeout_s": WRITE_TIMEOUT_S},
        policies=[str(POLICIES / "default.yaml"), str(clients)],
    )
    return GuardProcess(config, tmp_path / "guard.log").start()


def _stalled_stream(guard: GuardProcess) -> socket.socket:
    """A raw HTTP client that sends a streaming request and then never reads."""
    body = json.dumps(
        {"model": "teacher", "prompt": "hi", "max_tokens": 100, "stream": True}
    ).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up at once
    sock.connect(("127.0.0.1", guard.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def test_a_client_that_never_reads_is_cut_off_and_frees_its_slot_and_connection(
    tmp_path: Path,
) -> None:
    with FaultyUpstream("flood") as upstream:
        guard = _guard(tmp_path, upstream.url)
        sock = _stalled_stream(guard)
        try:
            started = time.monotonic()
            assert upstream.cancelled.wait(30), "the stalled stream was never cut off"
            waited = time.monotonic() - started
            # Not before the timeout (buffers fill within a fraction of a second here).
            assert waited >= WRITE_TIMEOUT_S
            sent = upstream.chunks_sent
            time.sleep(0.3)
            assert upstream.chunks_sent == sent  # the upstream stopped generating
            text = guard.metrics()
            assert metric_value(text, "guard_client_write_timeouts_total") == 1
            assert metric_value(text, "guard_requests_total", status="499") == 1

            # The same client (one concurrent request allowed) through the same pool (one
            # connection) is served again: the slot and the connection came back.
            upstream.mode = "short_stream"
            sdk = openai.OpenAI(base_url=guard.base_url, api_key=KEY, max_retries=0, timeout=20)
            stream = sdk.completions.create(model="teacher", prompt="hi", max_tokens=5, stream=True)
            assert sum(1 for chunk in stream if chunk.choices) == 20
        finally:
            sock.close()
            guard.stop()
