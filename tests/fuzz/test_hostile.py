"""Hand-written hostile HTTP, byte for byte on a raw socket: each case gets an OpenAI error
or a valid answer, never a 5xx or a hang, and the guard serves normally afterwards.

The figure: every case's status and answer time (printed with ``-s``), and the guard's count
of 5xx answers at the end (asserted zero).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import orjson
import pytest

from guard_server.testing import DEMO_KEY, GuardProcess, metric_value
from tests.fake_upstream import FaultyUpstream

MSG = b'"messages":[{"role":"user","content":"hi"}]'
CHAT = b'{"model":"teacher",' + MSG + b"}"
LIMIT = 1_048_576  # the default server.max_body_bytes


def _head(
    length: int | None, content_type: bytes = b"application/json", extra: bytes = b""
) -> bytes:
    size = (
        b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: guard\r\n"
        b"Authorization: Bearer " + DEMO_KEY.encode() + b"\r\n"
        b"Content-Type: " + content_type + b"\r\n" + size + extra + b"\r\n"
    )


def _post(body: bytes, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    return _head(len(body), content_type, extra + b"Connection: close\r\n") + body


def _chunked(body: bytes, piece: int = 4096) -> bytes:
    out = b"".join(
        b"%x\r\n" % len(body[i : i + piece]) + body[i : i + piece] + b"\r\n"
        for i in range(0, len(body), piece)
    )
    return _head(None, extra=b"Connection: close\r\n") + out + b"0\r\n\r\n"


def _exchange(port: int, data: bytes, timeout_s: float = 20) -> tuple[bytes, float]:
    """Send ``data`` (ignoring a reset once the guard has answered), read until the guard
    closes; the bytes read and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        # refused before the whole body was sent (413): the answer is already there
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks), time.monotonic() - started


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP responses in ``raw`` (Content-Length framed), in order."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        length = int(headers.get("content-length", len(rest)))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


def _check(raw: bytes) -> tuple[int, dict]:
    """The one response in ``raw``: a 200 chat completion or an OpenAI error (never 5xx)."""
    [(status, headers, body)] = _responses(raw)
    assert status < 500, raw[:500]
    assert headers["content-type"].startswith("application/json"), raw[:500]
    parsed = orjson.loads(body)
    if status == 200:
        assert parsed["object"] == "chat.completion"
    else:
        assert set(parsed["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in parsed["error"]["message"]
    return status, parsed


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream("ok") as server:
        yield server


@pytest.fixture(scope="module")
def guard(
    upstream: FaultyUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuardProcess]:
    from guard_server.testing import write_test_config

    directory = tmp_path_factory.mktemp("hostile")
    with GuardProcess(write_test_config(directory, [upstream.url]), directory / "guard.log") as g:
        yield g


@pytest.fixture(autouse=True)
def _still_serves(guard: GuardProcess) -> Iterator[None]:
    yield
    raw, _ = _exchange(guard.port, _post(CHAT))
    assert _check(raw)[0] == 200, "the guard no longer serves"


BIG_INT = b"9" * 5000
CASES: dict[str, tuple[bytes, int]] = {
    "100k nested [": (_post(b"[" * 100_000), 400),
    "100k nested under messages": (
        _post(b'{"model":"teacher","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        400,
    ),
    "1e400": (_post(b'{"model":"teacher",' + MSG + b',"temperature":1e400}'), 400),
    "a 5,000-digit integer": (
        _post(b'{"model":"teacher",' + MSG + b',"max_tokens":' + BIG_INT + b"}"),
        400,
    ),
    "invalid UTF-8 in a string": (
        _post(b'{"model":"teacher","messages":[{"role":"user","content":"\xff\xfe"}]}'),
        400,
    ),
    "a lone surrogate escape": (
        _post(b'{"model":"teacher","messages":[{"role":"user","content":"\\ud800"}]}'),
        400,
    ),
    "JSON sent as text/plain": (_post(CHAT, b"text/plain"), 200),
    "a form body": (_post(b"model=teacher&prompt=hi", b"application/x-www-form-urlencoded"), 400),
    "a multipart body": (
        _post(
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nteacher\r\n--b--\r\n',
            b"multipart/form-data; boundary=b",
        ),
        400,
    ),
    "two Content-Type headers": (_post(CHAT, extra=b"Content-Type: text/html\r\n"), 400),
    "a chunked body": (_chunked(CHAT), 200),
    "a chunked body over the limit": (
        _chunked(b'{"model":"teacher","prompt":"' + b"x" * (LIMIT + 10) + b'"}', 65536),
        413,
    ),
    "a 64 KiB header": (_post(CHAT, extra=b"X-Big: " + b"a" * 65536 + b"\r\n"), 431),
    "a 64 KiB Authorization header": (
        _post(CHAT, extra=b"Authorization: Bearer sk-" + b"k" * 65536 + b"\r\n"),
        431,
    ),
    "a 64 KiB request line": (b"POST /v1/" + b"a" * 65536 + b" HTTP/1.1\r\nHost: g\r\n\r\n", 431),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_request_gets_an_openai_error_or_an_answer(
    guard: GuardProcess, name: str
) -> None:
    data, expected = CASES[name]
    raw, seconds = _exchange(guard.port, data)
    status, body = _check(raw)
    print(f"\n{name}: {status} in {seconds * 1000:.0f} ms")
    assert status == expected, body
    assert seconds < 10
    if status == 431:
        assert b"kkkk" not in raw and "kkkk" not in guard.log()  # the header is never echoed


def test_duplicate_keys_take_the_last_value_and_vllm_sees_that_one(
    guard: GuardProcess, upstream: FaultyUpstream
) -> None:
    """Like Python's ``json`` and vLLM's parser, the last of duplicate keys wins; the guard
    keys on the body it parsed and sends vLLM that body re-serialized, so both see B only."""
    body = (
        b'{"model":"teacher","messages":[{"role":"user","content":"AAAA"}],'
        b'"messages":[{"role":"user","content":"BBBB"}],"max_tokens":3,"max_tokens":2}'
    )
    upstream.bodies.clear()
    raw, _ = _exchange(guard.port, _post(body))
    assert _check(raw)[0] == 200
    [sent] = upstream.bodies
    assert sent.count(b'"messages"') == 1 and b"AAAA" not in sent
    assert json.loads(sent)["messages"] == [{"role": "user", "content": "BBBB"}]
    assert json.loads(sent)["max_tokens"] == 2


def test_two_pipelined_requests_get_two_answers_in_order(guard: GuardProcess) -> None:
    first = _head(len(CHAT)) + CHAT
    second = _post(b"[" * 1000)
    raw, seconds = _exchange(guard.port, first + second)
    answers = _responses(raw)
    print(f"\npipelined: {[a[0] for a in answers]} in {seconds * 1000:.0f} ms")
    assert [status for status, _, _ in answers] == [200, 400]


def test_no_hostile_request_was_a_5xx(guard: GuardProcess) -> None:
    text = guard.metrics()
    errors = sum(metric_value(text, "guard_requests_total", status=str(s)) for s in range(500, 600))
    print(f"\nguard 5xx answers over the hostile cases: {errors:g}")
    assert errors == 0
    assert "unhandled error" not in guard.log() and "Traceback" not in guard.log()
