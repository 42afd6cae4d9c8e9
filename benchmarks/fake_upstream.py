"""A fast fake OpenAI upstream for the benchmarks: canned JSON, canned SSE, /health."""

#     .venv/bin/python -m benchmarks.fake_upstream --port 9000 [--delay-ms 0] [--chunk-delay-ms 0]
#
# Answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` like vLLM would, with
# one generated token per ``max_tokens`` (default 16): a whole JSON body, or with
# ``"stream": true`` one SSE chunk per token, a usage chunk when ``stream_options`` asks for
# it, then ``data: [DONE]``. With ``logprobs`` it returns canned logprobs (``top_logprobs`` /
# ``logprobs`` entries per token), so the guard's logprob hardening runs for real. Responses
# are built once per shape and cached; a request costs a JSON parse and a write.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
from functools import cache
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_server import Server

MAX_TOKENS = 4096
DEFAULT_TOKENS = 16
_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"
_EMBEDDINGS = "/v1/embeddings"
EMBEDDING_DIMENSIONS = 16


def _token(i: int) -> str:
    return f" t{i % 10}"


def _top(i: int, k: int) -> list[tuple[str, float]]:
    """``k`` alternatives for position ``i``, the sampled token first, in descending order."""
    return [(_token(i + j), -0.05 - 0.7 * j) for j in range(k)]


def _chat_logprobs(positions: range, k: int) -> dict[str, Any]:
    content = []
    for i in positions:
        top = _top(i, max(k, 1))
        content.append(
            {
                "token": top[0][0],
                "logprob": top[0][1],
                "bytes": list(top[0][0].encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top[:k]
                ],
            }
        )
    return {"content": content}


def _completion_logprobs(positions: range, k: int, offset: int) -> dict[str, Any]:
    tops = [_top(i, max(k, 1)) for i in positions]
    tokens = [top[0][0] for top in tops]
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [top[0][1] for top in tops],
        "top_logprobs": [dict(top[:k]) for top in tops] if k else None,
        "text_offset": offsets,
    }


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}


@cache
def whole_response(path: str, tokens: int, logprobs: int | None) -> bytes:
    """The canned non-streaming body for one shape (endpoint, tokens, logprob count)."""
    text = "".join(_token(i) for i in range(tokens))
    positions = range(tokens)
    if path == _CHAT:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None if logprobs is None else _chat_logprobs(positions, logprobs),
            "finish_reason": "length",
            "stop_reason": None,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None if logprobs is None else _completion_logprobs(positions, logprobs, 0),
            "finish_reason": "length",
            "stop_reason": None,
        }
        kind = "text_completion"
    body = {
        "id": "cmpl-bench",
        "object": kind,
        "created": 1700000000,
        "model": "teacher",
        "choices": [choice],
        "usage": _usage(tokens),
    }
    return orjson.dumps(body)


@cache
def stream_chunks(path: str, tokens: int, logprobs: int | None, usage: bool) -> tuple[bytes, ...]:
    """The canned SSE events for one shape: one per token, the usage event, ``[DONE]``."""
    chat = path == _CHAT
    kind = "chat.completion.chunk" if chat else "text_completion"
    events = []
    offset = 0
    for i in range(tokens):
        token = _token(i)
        if chat:
            delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else _chat_logprobs(range(i, i + 1), logprobs),
                "finish_reason": "length" if i == tokens - 1 else None,
            }
        else:
            choice = {
                "index": 0,
                "text": token,
                "logprobs": None
                if logprobs is None
                else _completion_logprobs(range(i, i + 1), logprobs, offset),
                "finish_reason": "length" if i == tokens - 1 else None,
            }
        offset += len(token)
        chunk = {
            "id": "cmpl-bench",
            "object": kind,
            "created": 1700000000,
            "model": "teacher",
            "choices": [choice],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if usage:
        chunk = {
            "id": "cmpl-bench",
            "object": kind,
            "created": 1700000000,
            "model": "teacher",
            "choices": [],
            "usage": _usage(tokens),
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(_DONE)
    return tuple(events)


def embeddings_response(body: dict[str, Any]) -> bytes:
    """One unit vector of ``EMBEDDING_DIMENSIONS`` floats per input, as vLLM answers."""
    inputs = body.get("input")
    count = (
        len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    )
    vector = [1.0 / math.sqrt(EMBEDDING_DIMENSIONS)] * EMBEDDING_DIMENSIONS
    data = [{"index": i, "object": "embedding", "embedding": vector} for i in range(count)]
    usage = {"prompt_tokens": 4 * count, "total_tokens": 4 * count, "completion_tokens": 0}
    reply = {"id": "embd-bench", "object": "list", "created": 1700000000, "model": "teacher",
             "data": data, "usage": usage}  # fmt: skip
    return orjson.dumps(reply)


def _shape(path: str, body: dict[str, Any]) -> tuple[int, int | None]:
    tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_TOKENS
    tokens = max(1, min(int(tokens), MAX_TOKENS))
    logprobs: int | None = None
    if path == _CHAT:
        if body.get("logprobs") is True:
            logprobs = int(body.get("top_logprobs") or 0)
    elif body.get("logprobs") is not None:
        logprobs = int(body["logprobs"])
    if logprobs is not None:
        logprobs = max(0, min(logprobs, 20))
    return tokens, logprobs


class FakeUpstream:
    """The request handler (a low-level aiohttp server: no router, no middleware)."""

    def __init__(self, delay_s: float = 0.0, chunk_delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.chunk_delay_s = chunk_delay_s

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if request.method == "GET":
            if path == "/health":
                return web.Response(body=b"ok")
            if path == "/v1/models":
                data = {"object": "list", "data": [{"id": "teacher", "object": "model"}]}
                return web.Response(body=orjson.dumps(data), headers=_JSON)
            return web.Response(status=404)
        if path == _EMBEDDINGS:
            return web.Response(body=embeddings_response(orjson.loads(await request.read())),
                                headers=_JSON)  # fmt: skip
        if path not in (_CHAT, _COMPLETIONS):
            return web.Response(status=404)
        try:
            body = orjson.loads(await request.read())
            tokens, logprobs = _shape(path, body)
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            error = {"error": {"message": "bad request", "type": "BadRequestError", "code": 400}}
            return web.Response(status=400, body=orjson.dumps(error), headers=_JSON)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not body.get("stream"):
            return web.Response(body=whole_response(path, tokens, logprobs), headers=_JSON)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage", True))
        response = web.StreamResponse(headers=_SSE)
        await response.prepare(request)
        for event in stream_chunks(path, tokens, logprobs, usage):
            await response.write(event)
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await response.write_eof()
        return response


async def serve(sock: socket.socket, handler: FakeUpstream, ready: str | None) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    server = Server(handler, access_log=None)
    listener = await loop.create_server(server, sock=sock, backlog=4096)
    if ready:
        print(ready, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    listener.close()
    await server.shutdown(1)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def main() -> None:
    """Command line: one process (or ``--workers N`` forked ones sharing the port)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before answering")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="wait between chunks")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    handler = FakeUpstream(args.delay_ms / 1000, args.chunk_delay_ms / 1000)
    sock = _listen(args.host, args.port)
    ready = f"fake upstream listening on http://{args.host}:{sock.getsockname()[1]}"
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            asyncio.run(serve(sock, handler, None))
            os._exit(0)
        children.append(pid)
    try:
        asyncio.run(serve(sock, handler, ready))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
