"""Red team: nothing in a decoyed or perturbed answer tells the client it was flagged.

Before: with ``stop: ["0","1","2","3"]`` and ``include_stop_str_in_output`` a decoyed
answer ended in one digit while ``stop_reason`` named another; ``x-ratelimit-limit-*``
showed the tightened limit; a flagged client asking 5 logprobs got 1; the decoy model was
listed and callable; one digit map per client let one checked answer reveal every decoy.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import yaml

from guard_server.canonical import canonical_input
from guard_server.defences.decoy import digit_map
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.auth import hash_key
from guard_server.pipeline.decoy import Decoy, DecoyPlan
from guard_server.teacher.task import make_problems
from guard_server.testing import DEMO_KEY, POLICIES, TRUSTED_KEY, GuardProcess, write_test_config

SECRET = "redteam-output-secret-0123456789abcdef"
ADMIN_KEY = "sk-test-redteam-admin"
# Every action from 0.1 on: a client that asks for the tier's maximal top-k logprobs scores
# 0.30 and is decoyed; logprobs below the maximum score 0.05 (pass). A flagged client keeps
# asking for the maximum (or asks a few times first), so that it stays flagged. Maximal
# logprobs alone count as enough evidence for a decoy here (`evidence_min` 0.2).
EVIDENCE_MIN = 0.2
THRESHOLDS = {"tighten": 0.1, "perturb": 0.1, "decoy": 0.1, "block": 1.01}
LIMITS = {"requests_per_minute": 60, "tokens_per_minute": 60_000}
MAX_TOP = 6
CLIENTS = ("stopper", "mapper", "limited", "shaped", "honest")
PROBLEMS = make_problems(12, seed=16, split="heldout")


def _key(client: str) -> str:
    return f"sk-test-redteam-{client}"


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory, vllm_url: str):  # type: ignore[no-untyped-def]
    """The default tier with low thresholds (``watched``), and the trusted one (``watched_t``)."""
    directory = tmp_path_factory.mktemp("decoy-tells")
    tiers = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]
    detection = {"thresholds": THRESHOLDS, "evidence_min": EVIDENCE_MIN}
    watched = {**tiers["default"], "detection": detection, "limits": LIMITS}
    watched["logprobs"] = {**watched["logprobs"], "max_top": MAX_TOP}
    policy = {
        "tiers": {
            "watched": watched,
            "watched_t": {**tiers["trusted"], "detection": detection},
        },
        "clients": {
            **{c: {"tier": "watched", "keys": [hash_key(_key(c))]} for c in CLIENTS},
            **{f"{c}_t": {"tier": "watched_t", "keys": [hash_key(_key(c + "_t"))]}
               for c in ("prompter", "honest")},
        },
    }  # fmt: skip
    (directory / "watched.yaml").write_text(yaml.safe_dump(policy))
    policies = [str(POLICIES / f) for f in ("default.yaml", "demo-clients.yaml")]
    config = write_test_config(
        directory,
        [vllm_url],
        policies=[*policies, str(directory / "watched.yaml")],
        secret={"env": "GUARD_TEST_REDTEAM_SECRET"},
        admin={"key_hash": hash_key(ADMIN_KEY)},
    )
    process = GuardProcess(config, directory / "guard.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GUARD_TEST_REDTEAM_SECRET", SECRET)
        process.start()
    process.wait_ready()
    try:
        yield process
    finally:
        process.stop()


def _sdk(guard: GuardProcess, client: str) -> openai.OpenAI:
    key = {"demo": DEMO_KEY, "trusted": TRUSTED_KEY}.get(client) or _key(client)
    return openai.OpenAI(base_url=guard.base_url, api_key=key, max_retries=0, timeout=60)


def _flag(guard: GuardProcess, client: str, max_top: int = MAX_TOP) -> None:
    """Three requests for the tier's maximal top-k: the client is decoyed from then on (for
    a few requests without, or for as long as it keeps asking for the maximum)."""
    for _ in range(3):
        _sdk(guard, client).chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
            logprobs=True, top_logprobs=max_top,
        )  # fmt: skip
    report = httpx.get(
        f"{guard.url}/admin/clients/{client}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    assert report["action"] == "decoy", report


def _chat(guard: GuardProcess, client: str, question: str, **extra: Any) -> Any:
    return _sdk(guard, client).chat.completions.with_raw_response.create(
        model="teacher", messages=[{"role": "user", "content": question}], max_tokens=40,
        temperature=0, **extra,
    )  # fmt: skip


def test_stop_reason_agrees_with_the_mapped_content(guard: GuardProcess) -> None:
    _flag(guard, "stopper")
    stops = ["0", "1", "2", "3"]
    stopped = 0
    for problem in PROBLEMS:
        choice = (
            _chat(guard, "stopper", problem.question, stop=stops, logprobs=True,
                  top_logprobs=MAX_TOP, extra_body={"include_stop_str_in_output": True})
            .parse().choices[0]
        )  # fmt: skip
        content = choice.message.content or ""
        reason = choice.model_extra.get("stop_reason")
        # No stop string before the end (the model stopped at the first one it wrote) ...
        assert not any(stop in content[:-1] for stop in stops), content
        if isinstance(reason, str):
            # ... and the one that stopped it is the one the content ends with.
            stopped += 1
            assert reason in stops and content.endswith(reason), (content, reason)
    assert stopped >= 3


def test_digit_maps_differ_per_prompt_and_hold_for_a_repeat(guard: GuardProcess) -> None:
    _flag(guard, "mapper")
    maps = []
    for problem in PROBLEMS[:2]:
        messages = [{"role": "user", "content": problem.question}]
        identity = canonical_input(
            Endpoint.CHAT, {"model": "teacher", "messages": messages}
        ).identities[0]
        digits = digit_map(SECRET.encode(), "mapper", identity)
        maps.append(digits.forward)
        flagged = {"logprobs": True, "top_logprobs": MAX_TOP}  # keeps it flagged
        decoyed = _chat(guard, "mapper", problem.question, **flagged).parse()
        decoyed = decoyed.choices[0].message.content
        # The decoy is the real model in a permuted world: its answer to the permuted
        # question (asked by an unflagged client), mapped back.
        truth = _chat(guard, "honest", digits.hide(problem.question)).parse()
        assert decoyed == digits.show(truth.choices[0].message.content or "")
        assert re.search(r"\d", decoyed or "")
        again = _chat(guard, "mapper", problem.question, **flagged).parse()
        again = again.choices[0].message.content
        assert again == decoyed  # repeating the question reveals nothing
        stream = _sdk(guard, "mapper").chat.completions.create(
            model="teacher", messages=messages, max_tokens=40, temperature=0, stream=True,
            **flagged,
        )  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == decoyed
    assert maps[0] != maps[1]  # one checked answer says nothing about another prompt's map


def test_flagged_headers_show_the_configured_limit_while_the_tight_one_applies(
    guard: GuardProcess,
) -> None:
    _flag(guard, "limited")
    honest = _chat(guard, "honest", "hi", logprobs=True, top_logprobs=5)
    flagged = _chat(guard, "limited", "hi", logprobs=True, top_logprobs=MAX_TOP)
    names = {name for name in honest.headers if name.startswith("x-")}
    assert names == {name for name in flagged.headers if name.startswith("x-")}
    for name in ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-guard-policy"):
        assert flagged.headers[name] == honest.headers[name], name
    assert flagged.headers["x-ratelimit-limit-requests"] == "60"
    # Four requests spent: the shown bucket is the configured one's after four requests (the
    # tightened bucket of 15 alone would show at most 11).
    assert int(flagged.headers["x-ratelimit-remaining-requests"]) >= 55
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert re.fullmatch(r"\d+ms|[\d.]+s|\d+m\d+s", flagged.headers[name])
    # The tightened limit (60 x 0.25 = 15 a minute) still applies, and still shows 60.
    sdk = _sdk(guard, "limited")
    for sent in range(5, 40):
        try:
            sdk.completions.create(model="teacher", prompt="hi", max_tokens=1, logprobs=MAX_TOP)
        except openai.RateLimitError as caught:
            assert sent <= 20
            assert caught.response.headers["x-ratelimit-limit-requests"] == "60"
            break
    else:
        pytest.fail("the tightened limit was not enforced")


def test_flagged_logprobs_have_the_unflagged_shape(guard: GuardProcess) -> None:
    _flag(guard, "shaped")
    shapes = {}
    for client in ("honest", "shaped"):
        raw = _chat(guard, client, PROBLEMS[0].question, logprobs=True, top_logprobs=5)
        assert raw.headers["x-guard-policy"] == "tier=watched; hardened=logprobs"
        items = raw.parse().choices[0].logprobs.content
        for item in items:
            values = [top.logprob for top in item.top_logprobs]
            assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        shapes[client] = {len(item.top_logprobs) for item in items}
        completion = _sdk(guard, client).completions.create(
            model="teacher", prompt=PROBLEMS[1].question, max_tokens=8, temperature=0, logprobs=5
        )
        shapes[client] |= {len(top) for top in completion.choices[0].logprobs.top_logprobs}
    assert shapes["shaped"] == shapes["honest"] == {5}


def test_prompt_logprobs_of_a_decoyed_client_show_its_own_prompt(guard: GuardProcess) -> None:
    _flag(guard, "prompter_t", max_top=20)
    seen = {}
    for client in ("honest_t", "prompter_t"):
        completion = _sdk(guard, client).completions.create(
            model="teacher", prompt=PROBLEMS[2].question, max_tokens=2, temperature=0,
            extra_body={"prompt_logprobs": 1},
        )  # fmt: skip
        positions = completion.choices[0].model_extra["prompt_logprobs"][1:]
        # vLLM lists the prompt's own token first at each position.
        seen[client] = "".join(next(iter(p.values()))["decoded_token"] for p in positions)
    assert seen["prompter_t"] == seen["honest_t"]
    assert re.search(r"\d", seen["honest_t"])


def test_every_text_the_model_writes_is_mapped_alike() -> None:
    digits = digit_map(SECRET.encode(), "unit", b"prompt")
    ctx = SimpleNamespace(
        plan=SimpleNamespace(decoy=DecoyPlan("misinformation", maps=(digits,))),
        endpoint=Endpoint.CHAT,
    )
    ctx.body = {"n": 1}
    call = {
        "id": "call_7",
        "type": "function",
        "function": {"name": "f1", "arguments": '{"x": 12}'},
    }
    message = {"content": "12", "reasoning": "3", "reasoning_content": "4", "tool_calls": [call]}
    payload = {
        "choices": [{"index": 0, "message": message, "stop_reason": "5"}],
        "prompt_logprobs": [None, {"17": {"logprob": -1.0, "rank": 1, "decoded_token": "6"}}],
    }
    Decoy().response(ctx, payload, streaming=False)  # type: ignore[arg-type]
    choice = payload["choices"][0]
    shown = choice["message"]
    assert (shown["content"], shown["reasoning"], shown["reasoning_content"]) == tuple(
        digits.show(text) for text in ("12", "3", "4")
    )
    assert shown["tool_calls"][0]["function"] == {
        "name": digits.show("f1"),
        "arguments": digits.show('{"x": 12}'),
    }
    assert shown["tool_calls"][0]["id"] == "call_7"  # vLLM's, not the model's
    assert choice["stop_reason"] == digits.show("5")
    assert payload["prompt_logprobs"][1]["17"]["decoded_token"] == digits.show("6")
    # Streamed tool-call arguments come in pieces; each piece maps the same way.
    pieces = ['{"x": ', "1", "2}"]
    for piece in pieces:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        chunk = {"choices": [{"index": 0, "delta": delta}]}
        Decoy().response(ctx, chunk, streaming=True)  # type: ignore[arg-type]
        assert delta["tool_calls"][0]["function"]["arguments"] == digits.show(piece)


def test_every_text_of_a_responses_answer_is_mapped_alike() -> None:
    digits = digit_map(SECRET.encode(), "unit", b"prompt")
    ctx = SimpleNamespace(
        plan=SimpleNamespace(decoy=DecoyPlan("misinformation", maps=(digits,))),
        endpoint=Endpoint.RESPONSES,
        echo={"instructions": "Use 2 words."},
    )
    logprob = {"token": "12", "logprob": -0.5, "bytes": list(b"12"), "top_logprobs": []}
    text = {"type": "output_text", "text": "12", "annotations": [], "logprobs": [logprob]}
    output = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"text": "34"}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "content": [text]},
        {"type": "function_call", "call_id": "call_7", "name": "f1", "arguments": '{"x": 5}'},
    ]
    response = {"object": "response", "instructions": "Use 9 words.", "output": output}
    Decoy().response(ctx, response, streaming=False)  # type: ignore[arg-type]
    assert response["instructions"] == "Use 2 words."  # the echo, as the client sent it
    assert output[0]["content"][0]["text"] == digits.show("34")
    assert text["text"] == digits.show("12") and logprob["token"] == digits.show("12")
    assert bytes(logprob["bytes"]) == digits.show("12").encode()
    assert (output[2]["name"], output[2]["arguments"]) == (
        digits.show("f1"),
        digits.show('{"x": 5}'),
    )
    assert output[2]["call_id"] == "call_7"  # vLLM's, not the model's
    # every streamed event that carries text: deltas and the done events that repeat them
    events = [
        {"type": "response.output_text.delta", "delta": "7", "logprobs": [dict(logprob)]},
        {"type": "response.output_text.done", "text": "78", "logprobs": []},
        {"type": "response.function_call_arguments.delta", "delta": "9"},
        {"type": "response.reasoning_text.delta", "delta": "0"},
        {"type": "response.content_part.done", "part": {"type": "output_text", "text": "78"}},
    ]
    for event in events:
        Decoy().response(ctx, event, streaming=True)  # type: ignore[arg-type]
    assert [events[0]["delta"], events[1]["text"], events[2]["delta"], events[3]["delta"]] == [
        digits.show(t) for t in ("7", "78", "9", "0")
    ]
    assert events[4]["part"]["text"] == digits.show("78")


@pytest.fixture
def decoy_model_guard(tmp_path: Path, vllm_url: str):  # type: ignore[no-untyped-def]
    """``teacher`` and a decoy model ``teacher-small`` (the same vLLM, under another name)."""
    tiers = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]
    detection = {
        "thresholds": THRESHOLDS,
        "evidence_min": EVIDENCE_MIN,
        "decoy": {"source": "model", "model": "teacher-small"},
    }
    policy = {
        "tiers": {"routed": {**tiers["default"], "detection": detection}},
        "clients": {"routed": {"tier": "routed", "keys": [hash_key(_key("routed"))]}},
    }
    (tmp_path / "routed.yaml").write_text(yaml.safe_dump(policy))
    upstream = {"urls": [vllm_url], "served_model": "teacher"}
    config = write_test_config(
        tmp_path,
        [vllm_url],
        upstreams={"teacher": upstream, "teacher-small": upstream},
        policies=[
            *(str(POLICIES / f) for f in ("default.yaml", "demo-clients.yaml")),
            str(tmp_path / "routed.yaml"),
        ],
    )
    process = GuardProcess(config, tmp_path / "guard.log").start()
    try:
        yield process
    finally:
        process.stop()


def test_the_decoy_model_is_neither_listed_nor_callable(decoy_model_guard: GuardProcess) -> None:
    guard = decoy_model_guard
    for client in ("demo", "trusted", "routed"):
        sdk = _sdk(guard, client)
        assert [model.id for model in sdk.models.list()] == ["teacher"]
        with pytest.raises(openai.NotFoundError) as caught:
            sdk.completions.create(model="teacher-small", prompt="hi", max_tokens=1)
        error = caught.value.response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        with pytest.raises(openai.NotFoundError) as caught:
            sdk.models.retrieve("teacher-small")
        assert caught.value.response.json()["error"] == error
    # A decoyed client is answered by it, under the name it asked for.
    sdk = _sdk(guard, "routed")
    sdk.completions.create(model="teacher", prompt="hi", max_tokens=1, logprobs=5)
    assert sdk.completions.create(model="teacher", prompt="hi", max_tokens=1).model == "teacher"


def test_a_decoy_model_cannot_be_offered(tmp_path: Path) -> None:
    from guard_server.config.loader import ConfigError, load_settings

    decoy = {"thresholds": THRESHOLDS, "decoy": {"source": "model", "model": "small"}}
    for models, problem in ((["small"], "is a decoy model"), (["*"], "every configured model")):
        upstreams = {"small": {"urls": ["http://127.0.0.1:9"]}}
        if models == ["small"]:
            upstreams["big"] = {"urls": ["http://127.0.0.1:9"]}
        tier = {"models": models, "detection": decoy}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"tiers": {"t": tier}}))
        config = {"upstreams": upstreams, "policies": ["p.yaml"]}
        (tmp_path / "g.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError, match=problem):
            load_settings(tmp_path / "g.yaml")
