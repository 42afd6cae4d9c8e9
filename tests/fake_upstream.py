"""A fault-injection upstream for the failure tests only (everything else uses real vLLM)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import threading
import time

from aiohttp import web

from guard_server.testing import free_port


def _reset(request: web.Request) -> None:
    """Reset the connection (RST, not FIN): what a crashed or overloaded upstream does."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


_RESPONSE = {"id": "resp_1", "object": "response", "model": "teacher", "output": [],
             "status": "in_progress", "created_at": 0}  # fmt: skip
_SEQUENCE = itertools.count()


def _event(kind: str, **fields: object) -> bytes:
    """One Responses API event, with its ``event:`` line."""
    body = {"type": kind, "sequence_number": next(_SEQUENCE), **fields}
    if kind == "response.output_text.delta":
        body.update(item_id="msg_1", output_index=0, content_index=0, logprobs=[])
    return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()


def _chunk(text: str) -> bytes:
    return (
        b'data: {"id":"cmpl-1","object":"text_completion","created":0,"model":"teacher",'
        b'"choices":[{"index":0,"text":"' + text.encode() + b'","logprobs":null,'
        b'"finish_reason":null}]}\n\n'
    )


_COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 0,
    "model": "teacher",
    "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


_CHAT_COMPLETION = {
    **_COMPLETION,
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
}


async def _answer(request: web.Request, body: bytes) -> web.StreamResponse:
    """A valid answer to ``body``: whole, or three chunks then ``[DONE]``."""
    chat = request.path.endswith("/chat/completions")
    if b'"stream":true' not in body.replace(b" ", b""):
        return web.json_response(_CHAT_COMPLETION if chat else _COMPLETION)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(3):
        if chat:
            await response.write(
                b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"teacher",'
                b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
            )
        else:
            await response.write(_chunk("x"))
    await response.write(b"data: [DONE]\n\n")
    return response


class FaultyUpstream:
    """An OpenAI-like server whose behaviour the test picks with ``mode``.

    Modes: ``ok`` (a valid answer: a completion or chat completion, whole or as a stream of
    three chunks; every request body is kept in ``bodies``), ``error500``, ``hang``,
    ``slow_stream`` (a chunk every 50 ms, for 10 s),
    ``stall_stream`` (two chunks, then nothing for 30 s),
    ``short_stream`` (20 chunks, 100 ms apart, then [DONE]), ``break_stream`` (two
    chunks, then the connection drops), ``flood`` (8 KiB chunks as fast as the guard
    takes them, for up to 60 s), ``reset`` (the connection is reset, TCP RST, as soon as
    the request's headers are in, its body unread), ``not_json`` (200 with a body that is
    not JSON, or an event stream whose first event is not), ``error_then_reset`` (a 500
    whose body is cut off by a reset) and ``close_reused`` (a connection answers one request,
    then resets when the next one arrives on it: a kept-alive connection the server was
    closing as the client reused it).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.requests = 0
        self.cancelled = threading.Event()
        self.chunks_sent = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None
        self._served: set[int] = set()  # close_reused: connections that answered once
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/responses", self._generate)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._started.set()
        self._loop.run_forever()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        try:
            return await self._respond(request)
        except asyncio.CancelledError:  # the guard closed the connection before the end
            self.cancelled.set()
            raise

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "reset":
            _reset(request)
            return web.Response()  # never sent: the connection is gone
        if self.mode == "close_reused":
            connection = id(request.transport)
            if connection in self._served:
                _reset(request)
                return web.Response()
            self._served.add(connection)
            await request.read()
            return web.json_response(_COMPLETION)
        body = await request.read()
        if self.mode == "ok":
            self.bodies.append(body)
            return await _answer(request, body)
        if self.mode == "not_json":
            if b'"stream":true' in body.replace(b" ", b""):
                text = "data: <html>upstream proxy error</html>\n\n"
                return web.Response(text=text, content_type="text/event-stream")
            return web.Response(text="<html>upstream proxy error</html>", content_type="text/html")
        if self.mode == "error_then_reset":
            response = web.StreamResponse(status=500, headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b'{"error": {"message": "Trace')
            await asyncio.sleep(0.05)
            _reset(request)
            return response
        if self.mode == "error500":
            return web.json_response(
                {"error": {"message": "Traceback (most recent call last): secret internals"}},
                status=500,
            )
        if self.mode == "hang":
            await asyncio.sleep(30)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.mode == "break_events":  # a Responses API stream that breaks
            await response.write(_event("response.created", response=_RESPONSE))
            await response.write(_event("response.output_text.delta", delta="a"))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        if self.mode == "stall_stream":
            await response.write(_chunk("a") + _chunk("b"))
            await asyncio.sleep(30)
        if self.mode == "break_stream":
            await response.write(_chunk("a") + _chunk("b"))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        if self.mode == "short_stream":
            for _ in range(20):
                await response.write(_chunk("x"))
                self.chunks_sent += 1
                await asyncio.sleep(0.1)
        if self.mode == "flood":
            chunk = _chunk("x" * 8192)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await response.write(chunk)
                self.chunks_sent += 1
        deadline = time.monotonic() + 10
        while self.mode == "slow_stream" and time.monotonic() < deadline:
            await response.write(_chunk("x"))
            self.chunks_sent += 1
            await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
        return response
