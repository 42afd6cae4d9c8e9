"""Found by reading the code: the body reader returned what was buffered, so a body sent
slowly or over about 512 KiB was cut short and answered "not valid JSON". Now the whole body
is read, up to its Content-Length or the end of a chunked body: 413 past the limit, 408 when
it does not arrive in time (`server.body_timeout_s`, 2 s for this guard)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable

from guard_server.testing import GuardProcess
from tests.redteam.conftest import BODY_TIMEOUT_S, KEYS

LIMIT = 1_048_576  # server.max_body_bytes (the default)


def _exchange(
    guard: GuardProcess,
    pieces: Iterable[bytes],
    headers: dict[str, str],
    pause_s: float = 0.0,
) -> tuple[int, dict]:
    """Send a POST to /v1/chat/completions piece by piece; the status and the JSON answer."""
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{guard.port}",
        f"Authorization: Bearer {KEYS['rt-quiet']}",
        "Content-Type: application/json",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", guard.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the guard answered (413) and closed before the rest was sent
        answer = _response(sock)
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split()[1])
    head_bytes, _, body = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_bytes.lower():
        body = _unchunk(body)
    return status, json.loads(body)


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response (the server may keep reading the unsent body a while)."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
        head, found, body = answer.partition(b"\r\n\r\n")
        if not found:
            continue
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:") and len(body) >= int(line.split(b":")[1]):
                return answer
        if body.endswith(b"0\r\n\r\n"):
            return answer
    return answer


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def _body(model: str, content_bytes: int = 10, **fields: object) -> bytes:
    message = {"role": "user", "content": "x" * content_bytes}
    return json.dumps({"model": model, "messages": [message], **fields}).encode()


def _pieces(data: bytes, count: int) -> list[bytes]:
    step = -(-len(data) // count)
    return [data[i : i + step] for i in range(0, len(data), step)]


def test_a_body_sent_slowly_is_read_whole(rt_guard: GuardProcess) -> None:
    body = _body("teacher", max_tokens=2)
    status, answer = _exchange(
        rt_guard, _pieces(body, 5), {"Content-Length": str(len(body))}, pause_s=0.2
    )
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] is not None


def test_a_body_over_512_kib_is_read_whole(rt_guard: GuardProcess) -> None:
    body = _body("no-such-model", content_bytes=900_000)
    status, answer = _exchange(rt_guard, _pieces(body, 30), {"Content-Length": str(len(body))})
    assert status == 404, answer  # parsed whole: the unknown model, not "not valid JSON"
    assert answer["error"]["code"] == "model_not_found"


def test_a_chunked_body_is_read_whole_and_bounded(rt_guard: GuardProcess) -> None:
    def chunked(data: bytes, count: int) -> list[bytes]:
        frames = [
            f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in _pieces(data, count)
        ]
        return [*frames, b"0\r\n\r\n"]

    body = _body("no-such-model", content_bytes=700_000)
    status, answer = _exchange(
        rt_guard, chunked(body, 20), {"Transfer-Encoding": "chunked"}, pause_s=0.01
    )
    assert status == 404, answer
    too_big = _body("no-such-model", content_bytes=LIMIT + 10)
    status, answer = _exchange(rt_guard, chunked(too_big, 40), {"Transfer-Encoding": "chunked"})
    assert status == 413 and answer["error"]["code"] == "request_too_large"


def test_a_declared_length_over_the_limit_is_refused_at_once(rt_guard: GuardProcess) -> None:
    status, answer = _exchange(rt_guard, [b"{}"], {"Content-Length": str(LIMIT + 1)})
    assert status == 413 and answer["error"]["code"] == "request_too_large"


def test_a_body_that_stalls_times_out(rt_guard: GuardProcess) -> None:
    body = _body("teacher")
    started = time.monotonic()
    status, answer = _exchange(rt_guard, [body[:20]], {"Content-Length": str(len(body))})
    waited = time.monotonic() - started
    assert status == 408 and answer["error"]["code"] == "request_timeout"
    assert BODY_TIMEOUT_S - 0.1 <= waited < BODY_TIMEOUT_S + 5
