"""Regression tests for what the fuzzer (test_fuzz.py) found, in process: no guard needed."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from guard_server.app import openai_errors
from guard_server.config.loader import load_settings
from guard_server.errors import GuardError
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.validate import parse_json_object, validate_request
from guard_server.testing import POLICIES

SETTINGS = load_settings(POLICIES / "guard.yaml")
CHAT = [{"role": "user", "content": "hi"}]


async def test_a_405_keeps_its_allow_header() -> None:
    """RFC 9110: a 405 names the methods the resource allows; the OpenAI-shaped body that
    replaces aiohttp's own must not drop the header."""

    async def completions(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application(middlewares=[openai_errors])
    app.router.add_post("/v1/completions", completions)
    async with TestClient(TestServer(app)) as client:
        response = await client.request("TRACE", "/v1/completions")
        body = await response.json()
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def _validated(endpoint: Endpoint, body: dict) -> dict:
    ctx = RequestContext(endpoint, SETTINGS, CIMultiDictProxy(CIMultiDict()), time.perf_counter())
    ctx.body = body
    asyncio.run(validate_request(ctx))
    return ctx.body


@pytest.mark.parametrize("value", [1.0, 1e2])
def test_an_integral_number_is_an_integer(value: float) -> None:
    """JSON Schema (and vLLM's pydantic) read 1.0 as the integer 1; so does the guard, and
    what it passes on (and keys on) is the integer."""
    body = _validated(Endpoint.CHAT, {"model": "m", "messages": CHAT, "max_tokens": value})
    assert body["max_tokens"] == int(value) and type(body["max_tokens"]) is int
    body = _validated(Endpoint.COMPLETIONS, {"model": "m", "prompt": [[1.0, 2], [3.0]]})
    assert body["prompt"] == [[1, 2], [3]] and all(type(t) is int for t in body["prompt"][0])


def test_a_fractional_number_is_still_not_an_integer() -> None:
    with pytest.raises(GuardError) as caught:
        _validated(Endpoint.CHAT, {"model": "m", "messages": CHAT, "n": 1.5})
    assert caught.value.code == "invalid_type"
    with pytest.raises(GuardError):
        _validated(Endpoint.COMPLETIONS, {"model": "m", "prompt": [1.5]})


@pytest.mark.parametrize("literal", [str(2**64), str(-(2**63) - 1), "1e300"])
def test_an_integer_beyond_64_bits_is_out_of_range_not_a_number(literal: str) -> None:
    """orjson reads an integer past 64 bits as a float, -2**63 - 1 as exactly -2**63: the
    client hears that its integer is out of range, and the guard never passes on another."""
    body = parse_json_object(f'{{"model": "m", "messages": [], "priority": {literal}}}'.encode())
    with pytest.raises(GuardError) as caught:
        _validated(Endpoint.CHAT, {**body, "messages": CHAT})
    assert caught.value.code == "invalid_value"
    assert caught.value.param == "priority"
    assert "between" in caught.value.message
