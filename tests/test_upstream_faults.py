"""Upstream failures map to OpenAI-shaped 502/503/504; a client disconnect cancels upstream."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest

from guard_server.testing import DEMO_KEY, GuardProcess, free_port, metric_value
from tests.fake_upstream import FaultyUpstream


@pytest.fixture
def guard_for(start_guard: Callable[..., GuardProcess]) -> Callable[..., GuardProcess]:
    """``guard_for(urls, read_timeout)``: a guard with short upstream timeouts, fast probes."""

    def start(urls: list[str], read_timeout: float = 30) -> GuardProcess:
        upstream = {
            "urls": urls,
            "timeouts": {"connect": 1, "read": read_timeout, "total": 60},
            "health_interval_s": 0.3,
        }
        return start_guard(urls, upstreams={"teacher": upstream})

    return start


def _sdk(guard: GuardProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=DEMO_KEY, max_retries=0, timeout=20)


def _complete(guard: GuardProcess, stream: bool = False):  # type: ignore[no-untyped-def]
    return _sdk(guard).completions.create(model="teacher", prompt="hi", max_tokens=5, stream=stream)


def test_upstream_down_is_503_and_not_ready(guard_for) -> None:  # type: ignore[no-untyped-def]
    guard = guard_for([f"http://127.0.0.1:{free_port()}"])
    with pytest.raises(openai.InternalServerError) as caught:
        _complete(guard)
    assert caught.value.status_code == 503
    assert caught.value.response.json()["error"]["code"] == "upstream_unavailable"
    assert httpx.get(guard.url + "/readyz").status_code == 503
    assert httpx.get(guard.url + "/healthz").status_code == 200


def test_upstream_500_is_502_without_its_internals(guard_for) -> None:  # type: ignore[no-untyped-def]
    with FaultyUpstream("error500") as upstream:
        guard = guard_for([upstream.url])
        with pytest.raises(openai.InternalServerError) as caught:
            _complete(guard)
    assert caught.value.status_code == 502
    assert "Traceback" not in caught.value.response.text
    assert metric_value(guard.metrics(), "guard_upstream_errors_total", kind="status") == 1


def test_a_broken_responses_stream_ends_with_an_error_event(guard_for) -> None:  # type: ignore[no-untyped-def]
    with FaultyUpstream("break_events") as upstream:
        guard = guard_for([upstream.url])
        stream = _sdk(guard).responses.create(
            model="teacher", input="hi", max_output_tokens=5, stream=True
        )
        events = list(stream)
    assert [event.type for event in events] == [
        "response.created",
        "response.output_text.delta",
        "error",
    ]
    assert events[0].response.model == "teacher"
    error = events[-1]
    assert error.code == "upstream_disconnected" and "Traceback" not in error.message
    assert error.sequence_number == events[1].sequence_number + 1


def test_upstream_timeout_is_504(guard_for) -> None:  # type: ignore[no-untyped-def]
    with FaultyUpstream("hang") as upstream:
        guard = guard_for([upstream.url], read_timeout=0.5)
        with pytest.raises(openai.InternalServerError) as caught:
            _complete(guard)
    assert caught.value.status_code == 504
    assert caught.value.response.json()["error"]["code"] == "upstream_timeout"


def test_broken_stream_ends_with_an_error_event_then_done(guard_for) -> None:  # type: ignore[no-untyped-def]
    with FaultyUpstream("break_stream") as upstream:
        guard = guard_for([upstream.url])
        response = httpx.post(
            guard.base_url + "/completions",
            json={"model": "teacher", "prompt": "hi", "max_tokens": 5, "stream": True},
            headers={"Authorization": f"Bearer {DEMO_KEY}"},
        )
    events = [line for line in response.text.split("\n\n") if line]
    assert response.status_code == 200
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2]
    assert sum('"text":"' in event for event in events) == 2


def test_client_disconnect_cancels_the_upstream_request(guard_for) -> None:  # type: ignore[no-untyped-def]
    with FaultyUpstream("slow_stream") as upstream:
        guard = guard_for([upstream.url])
        stream = _complete(guard, stream=True)
        for received, _ in enumerate(stream, start=1):
            if received == 3:
                break
        stream.close()
        assert upstream.cancelled.wait(5), "the upstream request was not cancelled"
        sent = upstream.chunks_sent
        time.sleep(0.3)
        assert upstream.chunks_sent == sent


def test_load_is_spread_and_a_dead_endpoint_is_skipped(guard_for) -> None:  # type: ignore[no-untyped-def]
    with FaultyUpstream("slow_stream") as first, FaultyUpstream("slow_stream") as second:
        dead = f"http://127.0.0.1:{free_port()}"
        guard = guard_for([first.url, dead, second.url], read_timeout=0.2)
        sdk = _sdk(guard)
        for _ in range(6):
            stream = sdk.completions.create(model="teacher", prompt="hi", max_tokens=5, stream=True)
            next(iter(stream))
            stream.close()
        assert first.requests >= 2 and second.requests >= 2
        assert first.requests + second.requests == 6
        text = guard.metrics()
        assert metric_value(text, "guard_upstream_healthy", endpoint=dead) == 0


def test_sigterm_drains_a_stream_and_refuses_new_requests(guard_for) -> None:  # type: ignore[no-untyped-def]
    import signal
    import threading

    with FaultyUpstream("short_stream") as upstream:
        guard = guard_for([upstream.url])
        received: list[str] = []
        stream = _sdk(guard).completions.create(
            model="teacher", prompt="hi", max_tokens=5, stream=True
        )
        iterator = iter(stream)
        received.append(next(iterator).choices[0].text)
        finished = threading.Event()

        def read_rest() -> None:
            received.extend(chunk.choices[0].text for chunk in iterator if chunk.choices)
            finished.set()

        reader = threading.Thread(target=read_rest)
        reader.start()
        guard.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # a loaded machine may take a moment to get there
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                httpx.get(guard.url + "/healthz", timeout=1)
                time.sleep(0.1)
            except httpx.HTTPError:
                refused = True
        assert refused, "the draining guard still accepted new connections"
        assert finished.wait(10), "the stream did not finish during the drain"
        reader.join()
        assert len(received) == 20
        assert guard.wait(10) == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt_bytes", [10, 900_000])
def test_a_reset_upstream_connection_is_a_502(guard_for, stream: bool, prompt_bytes: int) -> None:  # type: ignore[no-untyped-def]
    """An upstream that resets the connection before reading the body (a small one, or one
    the guard is still sending): every request a clean 502, never a 500."""
    with FaultyUpstream("reset") as upstream:
        guard = guard_for([upstream.url])
        for _ in range(5):
            response = httpx.post(
                guard.base_url + "/completions",
                json={
                    "model": "teacher",
                    "prompt": "x" * prompt_bytes,
                    "max_tokens": 5,
                    "stream": stream,
                },
                headers={"Authorization": f"Bearer {DEMO_KEY}"},
                timeout=20,
            )
            assert response.status_code == 502, response.text
            assert response.json()["error"]["code"] == "upstream_disconnected"
    assert "unhandled error" not in guard.log()


def test_a_kept_alive_connection_closed_as_it_is_reused_is_retried_once(guard_for) -> None:  # type: ignore[no-untyped-def]
    """The race behind issue 20's unexplained 502: the upstream closes an idle kept-alive
    connection just as the guard sends on it. The guard retries once on a new connection."""
    with FaultyUpstream("close_reused") as upstream:
        guard = guard_for([upstream.url])
        for _ in range(3):
            assert _complete(guard).choices[0].text == "ok"
        # the second request met the first one's connection (reset), then a new one; the
        # third found the pool empty and opened one (without the retry the second is a 502)
        assert upstream.requests == 4
    assert "unhandled error" not in guard.log()


@pytest.mark.parametrize("mode", ["not_json", "error_then_reset"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_garbled_upstream_answer_is_a_502(guard_for, mode: str, stream: bool) -> None:  # type: ignore[no-untyped-def]
    """A 200 that is not JSON (a proxy's HTML page), or an error body cut off by a reset: a
    502 in the guard's words (or, once a stream has started, an error event then [DONE])."""
    with FaultyUpstream(mode) as upstream:
        guard = guard_for([upstream.url])
        response = httpx.post(
            guard.base_url + "/completions",
            json={"model": "teacher", "prompt": "hi", "max_tokens": 5, "stream": stream},
            headers={"Authorization": f"Bearer {DEMO_KEY}"},
            timeout=20,
        )
    if response.status_code == 200:
        assert stream
        events = [event for event in response.text.split("\n\n") if event]
        assert events[-1] == "data: [DONE]"
        assert '"code":502' in events[-2]
    else:
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert error["type"] == "upstream_error"
        assert "html" not in error["message"] and "Trace" not in error["message"]
    assert "unhandled error" not in guard.log()


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(guard_for) -> None:  # type: ignore[no-untyped-def]
    """A client that closes its connection while its body is still arriving: the guard
    records it as gone (499), logs no internal error, and keeps serving."""
    import socket

    with FaultyUpstream("short_stream") as upstream:
        guard = guard_for([upstream.url])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", guard.port)) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: guard\r\n"
                    b"Authorization: Bearer " + DEMO_KEY.encode() + b"\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                    b'{"model": "teacher", "prompt": "'
                )
                time.sleep(0.2)
        time.sleep(0.5)
        text = guard.metrics()
        assert metric_value(text, "guard_requests_total", status="500") == 0
        assert metric_value(text, "guard_requests_total", status="499") == 3
        assert "unhandled error" not in guard.log()
        assert httpx.get(guard.url + "/healthz").status_code == 200
