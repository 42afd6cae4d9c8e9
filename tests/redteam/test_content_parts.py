"""Issue 16, item 4: content parts were not checked (`prompt_embeds` and `image_url` parts
reached vLLM; a multimodal upstream would fetch a URL of the client's choosing).

Now the tier lists the part types it takes (default: `text`); any other part is refused by
the guard and never forwarded.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from guard_server.testing import GuardProcess
from guard_server.upstream.vllm_process import free_port
from tests.redteam.conftest import post, upstream_calls


@pytest.fixture
def fetched() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that records every path asked of it."""
    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def _parts(*parts: Any) -> dict[str, Any]:
    return {
        "model": "teacher",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": list(parts)}],
    }


def test_non_text_parts_are_refused_and_never_forwarded(
    rt_guard: GuardProcess, fetched: tuple[str, list[str]]
) -> None:
    url, hits = fetched
    text = {"type": "text", "text": "What is in the picture?"}
    refused = [
        {"type": "image_url", "image_url": {"url": f"{url}/cat.png"}},
        {"type": "prompt_embeds", "data": "AAAAAAAA"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_embeds", "image_embeds": "AAAA"},
        {"type": "video_url", "video_url": {"url": f"{url}/cat.mp4"}},
        {"type": "audio_url", "audio_url": {"url": f"{url}/cat.wav"}},
    ]
    before = upstream_calls(rt_guard)
    for part in refused:
        response = post(rt_guard, "rt-quiet", "/chat/completions", _parts(text, part))
        assert response.status_code == 400, (part, response.text)
        error = response.json()["error"]
        assert error["code"] == "parameter_not_allowed" and f"`{part['type']}`" in error["message"]
    untyped = post(rt_guard, "rt-quiet", "/chat/completions", _parts({"image_url": f"{url}/x"}))
    assert untyped.status_code == 400 and untyped.json()["error"]["param"].startswith("messages")
    assert upstream_calls(rt_guard) == before
    assert hits == []


def test_text_parts_are_the_same_prompt_as_a_string(rt_guard: GuardProcess) -> None:
    as_parts = post(
        rt_guard,
        "rt-quiet",
        "/chat/completions",
        {**_parts({"type": "text", "text": "1 plus"}, "2"), "temperature": 0},
    )
    as_string = post(
        rt_guard,
        "rt-quiet",
        "/chat/completions",
        {
            "model": "teacher",
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "1 plus\n2"}],
        },
    )
    assert as_parts.status_code == as_string.status_code == 200
    message = as_parts.json()["choices"][0]["message"]["content"]
    assert message == as_string.json()["choices"][0]["message"]["content"]
