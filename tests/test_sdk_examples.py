"""README's "Calling it from the SDK": every code block runs, in order, against a guard in
front of real vLLM, and prints what the README says it shows."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from guard_server.testing import DEMO_KEY, REPO, GuardProcess

SECTION = "## Calling it from the SDK"


def _snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_readme_sdk_snippets_run(guard: GuardProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_BASE_URL", guard.base_url)
    monkeypatch.setenv("GUARD_API_KEY", DEMO_KEY)
    snippets = _snippets()
    assert len(snippets) == 7
    namespace: dict[str, object] = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for snippet in snippets:
            exec(compile(snippet, "README.md", "exec"), namespace)
    out = printed.getvalue()
    lines = out.splitlines()
    assert lines[0].strip() and lines[1].strip()  # chat, completions
    assert "\nused " in out and " tokens\n" in out  # the stream ended with response.completed
    assert "'teacher'" in out and "\nteacher\n" in out  # models.list / retrieve
    assert "tier=default; defaulted=max_tokens" in out
    assert "\nTrue\n" in out and "\ncheckout-7f3a\n" in out  # request ids
    assert "400 parameter_not_allowed response_format" in out
    assert re.search(r"^404 .*The model `gpt-4o` does not exist", out, flags=re.M)
    assert re.search(r"^401 .*Incorrect API key", out, flags=re.M)
    assert re.search(r"^'.*' -[0-9.e-]+ \['", out, flags=re.M)  # logprobs
