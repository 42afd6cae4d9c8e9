"""What the chaos tests share: a killable fake upstream process, streaming clients, keys."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import orjson
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import POLICIES, ChildProcess, free_port

KEY = "sk-test-chaos"


class FakeUpstreamProcess(ChildProcess):
    """``benchmarks.fake_upstream`` as a process of its own, to be killed: one token per
    ``max_tokens``, a stream chunk every ``chunk_delay_ms``. Up once ``/health`` answers."""

    def __init__(self, log_path: Path, chunk_delay_ms: float = 0, port: int | None = None):
        self.port = port or free_port()
        argv = [sys.executable, "-m", "benchmarks.fake_upstream", "--port", str(self.port),
                "--chunk-delay-ms", str(chunk_delay_ms)]  # fmt: skip
        super().__init__("fake upstream", argv, log_path)

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self, timeout_s: float) -> None:
        """Block until ``/health`` answers."""
        self.wait_http(self.url + "/health", timeout_s)


def client_policies(directory: Path, limits: dict, tier: str = "default") -> list[str]:
    """The shipped tiers plus one client (:data:`KEY`) of ``tier`` with ``limits``."""
    path = directory / "chaos-clients.yaml"
    entry = {"tier": tier, "keys": [hash_key(KEY)], "limits": limits}
    path.write_text(yaml.safe_dump({"clients": {"chaos": entry}}))
    return [str(POLICIES / "default.yaml"), str(path)]


def chat(max_tokens: int, stream: bool) -> dict:
    """A chat request body."""
    return {
        "model": "teacher",
        "messages": [{"role": "user", "content": "Count to a hundred."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def stream_events(
    client: httpx.AsyncClient, base_url: str, body: dict, started: list[int] | None = None
) -> tuple[int, list[str]]:
    """POST a streaming request; the status and the ``data:`` payloads received. Appends 1
    to ``started`` once the first event is in."""
    events: list[str] = []
    async with client.stream(
        "POST",
        base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, [response.text]
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 1 and started is not None:
                    started.append(1)
    return response.status_code, events


def content_chunks(events: list[str]) -> int:
    """How many events carry generated text."""
    count = 0
    for event in events:
        if event == "[DONE]":
            continue
        choices = orjson.loads(event).get("choices") or []
        count += sum(bool((c.get("delta") or {}).get("content")) for c in choices)
    return count


def error_events(events: list[str]) -> list[dict]:
    """The OpenAI error events among ``events``."""
    return [e["error"] for e in (orjson.loads(x) for x in events if x != "[DONE]") if "error" in e]
