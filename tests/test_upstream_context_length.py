"""The guard learns each upstream's context length from its ``/v1/models`` (it bounds a
filled-in or clamped ``max_tokens``), and learns it again when an endpoint comes back: vLLM
may restart with another ``--max-model-len``. The restarting server is a small stand-in on
loopback (fault injection); tests/test_openai_sdk.py checks the length read from real vLLM."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from guard_server.config.schema import UpstreamSettings
from guard_server.metrics import GuardMetrics
from guard_server.upstream.pool import ModelUpstream


class _RestartingServer:
    """``/health`` and ``/v1/models`` of one served model, that can go down and come back
    with another context length."""

    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.up = True
        self.model_reads = 0
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self.server = TestServer(app, host="127.0.0.1")

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.up else 503)

    async def _models(self, _: web.Request) -> web.Response:
        self.model_reads += 1
        data = [{"id": "teacher", "object": "model", "max_model_len": self.max_model_len}]
        return web.json_response({"object": "list", "data": data})


async def _until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_context_length_is_read_again_when_an_endpoint_comes_back() -> None:
    fake = _RestartingServer(max_model_len=256)
    await fake.server.start_server()
    settings = UpstreamSettings(
        urls=[str(fake.server.make_url("")).rstrip("/")],
        health_interval_s=0.05,
        unhealthy_after=1,
    )
    upstream = ModelUpstream("teacher", settings, GuardMetrics(CollectorRegistry()))
    try:
        await upstream.start()
        assert upstream.max_model_len == 256  # read before the first request
        await asyncio.sleep(0.3)  # several healthy probes: not read again while it stays up
        assert fake.model_reads == 1
        fake.up = False
        await _until(lambda: not upstream.ready)
        fake.max_model_len, fake.up = 1024, True  # restarted with a longer context
        await _until(lambda: upstream.ready)
        assert upstream.max_model_len == 1024 and fake.model_reads == 2
    finally:
        await upstream.close()
        await fake.server.close()
