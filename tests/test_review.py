"""The review workflow end to end: list, reset and pin clients through the admin API and the
CLI, on one guard (memory state) and on two guards sharing Redis, with real vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.teacher.task import make_problems
from guard_server.testing import (
    POLICIES,
    REPO,
    TRUSTED_KEY,
    GuardProcess,
    RedisProcess,
    metric_value,
    write_test_config,
)

ADMIN_KEY = "sk-admin-review"
CLIENTS = ["attacker", "honest", "expiring", "cli", *(f"c{i}" for i in range(5))]
KEYS = {client: f"sk-test-review-{client}" for client in [*CLIENTS, "app", "collector"]}
# Asking for the tier's maximal top-k logprobs scores 0.30 from the first request: past
# `decoy` at once (maximal logprobs alone count as enough evidence here: `evidence_min`),
# while plain requests stay at 0.
THRESHOLDS = {"tighten": 0.2, "perturb": 0.25, "decoy": 0.28, "block": 0.9}
TOP_CLIENTS = 3
QUESTION = [{"role": "user", "content": make_problems(1, seed=5, split="heldout")[0].question}]


def _config(directory: Path, vllm_url: str, state: dict | None = None, **sections) -> Path:
    """``watched``: the shipped ``application`` tier (end users scored) at ``THRESHOLDS``, for
    every client but ``collector``, on ``watched-default``: the ``default`` tier at them."""
    tiers = yaml.safe_load((POLICIES / "default.yaml").read_text())["tiers"]
    detection = {"thresholds": THRESHOLDS, "evidence_min": 0.2}

    def watched(base: str) -> dict:
        return {**tiers[base], "detection": {**tiers[base]["detection"], **detection}}

    clients = {c: {"tier": "watched", "keys": [hash_key(k)]} for c, k in KEYS.items()}
    clients["collector"]["tier"] = "watched-default"
    policy = {
        "tiers": {"watched": watched("application"), "watched-default": watched("default")},
        "clients": clients,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "watched.yaml").write_text(yaml.safe_dump(policy))
    overrides: dict = {
        "policies": [
            str(POLICIES / "default.yaml"),
            str(POLICIES / "demo-clients.yaml"),
            str(directory / "watched.yaml"),
        ],
        "admin": {"key_hash": hash_key(ADMIN_KEY)},
        "audit": {"path": str(directory / "audit.jsonl")},
        "metrics": {"top_clients": TOP_CLIENTS},
        **sections,
    }
    if state is not None:
        overrides["state"] = state
    return write_test_config(directory, [vllm_url], **overrides)


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory, vllm_url: str) -> Iterator[GuardProcess]:
    """One guard, memory state, shared by the tests of this module (each uses its clients)."""
    directory = tmp_path_factory.mktemp("review")
    process = GuardProcess(_config(directory, vllm_url), directory / "guard.log").start()
    try:
        yield process
    finally:
        process.stop()


def _ask(guard: GuardProcess, client: str, logprobs: bool = False) -> httpx.Response:
    body: dict = {"model": "teacher", "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    if logprobs:
        body.update(logprobs=True, top_logprobs=5)
    return httpx.post(
        guard.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS.get(client, client)}"},
        timeout=60,
    )


def _admin(
    guard: GuardProcess, method: str, path: str, key: str = ADMIN_KEY, **kwargs
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, guard.url + path, headers=headers, timeout=30, **kwargs)


def _pin(guard: GuardProcess, client: str, action: str, **fields) -> dict:
    body = {"action": action, "by": "alice@ops", "note": f"{action} for the test", **fields}
    response = _admin(guard, "PUT", f"/admin/clients/{client}/pin", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _audit(guard: GuardProcess) -> list[dict]:
    time.sleep(0.2)
    path = guard.config.parent / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _last_request(guard: GuardProcess, client: str) -> dict:
    lines = [r for r in _audit(guard) if r["event"] == "request" and r["client"] == client]
    return lines[-1]


def _content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_pins_and_a_reset_take_effect_at_once_and_are_audited(guard: GuardProcess) -> None:
    truth = _content(_ask(guard, TRUSTED_KEY))
    decoyed = _ask(guard, "attacker", logprobs=True)
    assert _content(decoyed) != truth  # misinformation: the digits are remapped
    assert _last_request(guard, "attacker")["action"] == "decoy"

    pin = _pin(guard, "attacker", "allow", expires_in_s=600)["pin"]
    assert pin["action"] == "allow" and pin["by"] == "alice@ops"
    assert _content(_ask(guard, "attacker", logprobs=True)) == truth  # served as pass
    line = _last_request(guard, "attacker")
    assert (line["action"], line["assessed"], line["pin"]) == ("pass", "decoy", "allow")
    assert line["reason"].startswith(f"pinned allow until {pin['until_iso']} by alice@ops; ")
    report = _admin(guard, "GET", "/admin/clients/attacker").json()
    assert (report["assessed"], report["action"], report["pin"]["action"]) == (
        "decoy",
        "pass",
        "allow",
    )

    _pin(guard, "attacker", "deny", expires_in_s=600)
    refused = _ask(guard, "attacker", logprobs=True)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "access_suspended"
    line = _last_request(guard, "attacker")
    assert (line["status"], line["action"], line["pin"]) == (403, "block", "deny")
    assert line["reason"].startswith("pinned deny")

    assert _pin(guard, "attacker", "auto")["pin"] is None
    assert _content(_ask(guard, "attacker", logprobs=True)) != truth  # the score decides: decoy
    assert _last_request(guard, "attacker")["action"] == "decoy"

    reset = _admin(guard, "POST", "/admin/clients/attacker/reset", json={"by": "bob", "note": "ok"})
    assert reset.status_code == 200, reset.text
    assert reset.json()["before"]["assessed"] == "decoy"
    report = _admin(guard, "GET", "/admin/clients/attacker").json()
    assert (report["score"], report["action"], report["profile"]) == (0.0, "pass", None)
    assert _content(_ask(guard, "attacker")) == truth  # a fresh profile: pass
    assert _last_request(guard, "attacker")["action"] == "pass"

    changes = [r for r in _audit(guard) if r["event"] != "request"]
    assert [(r["event"], r.get("action")) for r in changes] == [
        ("pin", "allow"),
        ("pin", "deny"),
        ("pin", "auto"),
        ("reset", None),
    ]
    assert all(r["client"] == "attacker" and r["ts"] and r["remote"] for r in changes)
    assert changes[0]["by"] == "alice@ops" and changes[0]["until"] == pin["until"]
    assert changes[1]["previous"]["action"] == "allow"
    assert (changes[3]["by"], changes[3]["note"]) == ("bob", "ok")
    assert changes[3]["before"]["requests"] == 4

    metrics = guard.metrics()
    assert metric_value(metrics, "guard_actions_total", action="pass", mode="pinned") == 1
    assert metric_value(metrics, "guard_actions_total", action="block", mode="pinned") == 1


def test_an_end_user_is_shown_pinned_and_reset_on_its_own(guard: GuardProcess) -> None:
    def ask(end_user: str, logprobs: bool = False) -> httpx.Response:
        body: dict = {"model": "teacher", "messages": QUESTION, "max_tokens": 8,
                      "temperature": 0, "safety_identifier": end_user}  # fmt: skip
        if logprobs:
            body.update(logprobs=True, top_logprobs=5)
        headers = {"Authorization": f"Bearer {KEYS['app']}"}
        return httpx.post(guard.base_url + "/chat/completions", json=body, headers=headers)

    truth = _content(_ask(guard, TRUSTED_KEY))
    for _ in range(12):  # the app's other users keep its key's own profile fine
        assert _content(ask("alice")) == truth
    assert _content(ask("mallory", logprobs=True)) != truth  # decoyed on her own scope
    line = _last_request(guard, "app")
    scope = line["scope"]
    assert (line["end_user"], line["action"]) == ("mallory", "decoy") and line["risk"] < 0.2
    assert scope.startswith("app~u:") and line["reason"].startswith(f"end user 'mallory' ({scope})")
    assert _content(ask("alice")) == truth
    report = _admin(guard, "GET", f"/admin/clients/{scope}").json()
    assert (report["client"], report["assessed"], report["profile"]["total"]) == (scope, "decoy", 1)
    assert _admin(guard, "GET", "/admin/clients/app").json()["assessed"] == "pass"
    # On the review board and the top-k gauge as an entry of its own, with its key's tier.
    decoyed = _admin(guard, "GET", "/admin/clients?assessed=decoy").json()["data"]
    row = next(row for row in decoyed if row["client"] == scope)
    assert (row["key"], row["tier"], row["action"]) == ("app", "watched", "decoy")
    labels = {"client": scope, "tier": "watched", "action": "decoy", "mode": "enforce"}
    assert metric_value(guard.metrics(), "guard_client_risk", **labels) == row["score"]

    _pin(guard, scope, "allow", expires_in_s=600)
    assert _content(ask("mallory", logprobs=True)) == truth  # her pin: served as pass
    line = _last_request(guard, "app")
    assert (line["action"], line["assessed"], line["pin"]) == ("pass", "decoy", "allow")
    _pin(guard, scope, "auto")
    reset = _admin(guard, "POST", f"/admin/clients/{scope}/reset", json={"by": "bob"}).json()
    assert reset["before"]["assessed"] == "decoy" and reset["client"] == scope
    assert _admin(guard, "GET", f"/admin/clients/{scope}").json()["profile"] is None
    assert _admin(guard, "GET", "/admin/clients/app").json()["profile"]["total"] == 15


def test_on_a_tier_without_end_users_a_named_end_user_is_its_key(guard: GuardProcess) -> None:
    """On the ``default`` tier end users are not scored: a client naming a fresh end user at
    every request is decoyed by its key's score as if it named none (on ``application``
    mallory's own scope decides, above); the ids are only written to the audit log."""
    truth = _content(_ask(guard, TRUSTED_KEY))
    headers = {"Authorization": f"Bearer {KEYS['collector']}"}
    for i in range(3):
        body = {"model": "teacher", "messages": QUESTION, "max_tokens": 8, "temperature": 0,
                "logprobs": True, "top_logprobs": 5, "safety_identifier": f"id-{i}"}  # fmt: skip
        response = httpx.post(guard.base_url + "/chat/completions", json=body, headers=headers)
        assert _content(response) != truth
        line = _last_request(guard, "collector")
        assert (line["end_user"], line["action"], line["tier"]) == (
            f"id-{i}",
            "decoy",
            "watched-default",
        )
        assert not {"scope", "end_user_risk", "newcomers_risk"} & set(line), line
        assert not line["reason"].startswith(("end user", "new end user")), line["reason"]
    report = _admin(guard, "GET", "/admin/clients/collector").json()
    assert (report["assessed"], report["profile"]["total"]) == ("decoy", 3)
    board = _admin(guard, "GET", "/admin/clients?limit=1000").json()["data"]
    assert not [row for row in board if row["client"].startswith("collector~")]


def test_a_pin_expires_by_itself(guard: GuardProcess) -> None:
    assert _ask(guard, "expiring").status_code == 200
    _pin(guard, "expiring", "deny", expires_in_s=1.5)
    assert _ask(guard, "expiring").status_code == 403
    time.sleep(1.6)
    assert _ask(guard, "expiring").status_code == 200
    line = _last_request(guard, "expiring")
    assert (line["action"], line["pin"]) == ("pass", None)
    assert _admin(guard, "GET", "/admin/clients/expiring").json()["pin"] is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/clients"),
        ("GET", "/admin/clients/honest"),
        ("POST", "/admin/clients/honest/reset"),
        ("PUT", "/admin/clients/honest/pin"),
    ],
)
def test_the_admin_api_refuses_other_keys(guard: GuardProcess, method: str, path: str) -> None:
    for key in ("", "not-a-key", KEYS["honest"], TRUSTED_KEY):
        response = _admin(guard, method, path, key=key, json={"action": "deny"})
        assert response.status_code == 401, (key, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    assert _admin(guard, "GET", "/admin/clients/honest").json()["pin"] is None  # unchanged


def test_bad_admin_calls_get_openai_shaped_errors(guard: GuardProcess) -> None:
    bad = [
        ("GET", "/admin/clients?limit=0", None, "limit"),
        ("GET", "/admin/clients?offset=-1", None, "offset"),
        ("GET", "/admin/clients?assessed=nuke", None, "assessed"),
        ("GET", "/admin/clients?pinned=maybe", None, "pinned"),
        ("PUT", "/admin/clients/honest/pin", {"action": "deny"}, "expires_in_s"),
        ("PUT", "/admin/clients/honest/pin", {"action": "deny", "expires_in_s": -5}, None),
        ("PUT", "/admin/clients/honest/pin", {"action": "deny", "until": "tomorrow"}, "until"),
        ("PUT", "/admin/clients/honest/pin", {"action": "maybe"}, "action"),
        ("PUT", "/admin/clients/honest/pin", {"action": "allow", "expires_in_s": 1e9}, None),
    ]
    for method, path, body, param in bad:
        response = _admin(guard, method, path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        if param:
            assert error["param"] == param, (path, body, error)
    missing = _admin(guard, "PUT", "/admin/clients/nobody/pin", json={"action": "auto"})
    assert missing.status_code == 404
    assert _admin(guard, "GET", "/admin/clients/honest").json()["pin"] is None


def test_the_list_is_sorted_paged_and_filtered(guard: GuardProcess) -> None:
    for i in range(5):  # client c<i> asks for maximal logprobs in i of its 4 requests
        for j in range(4):
            assert _ask(guard, f"c{i}", logprobs=j < i).status_code == 200
    everyone = _admin(guard, "GET", "/admin/clients?limit=1000").json()
    rows = everyone["data"]
    assert everyone["total"] == len(rows) and everyone["next_offset"] is None
    scores = [row["score"] for row in rows]  # one tier: by score, highest first
    assert None not in scores and scores == sorted(scores, reverse=True)
    mine = [row["client"] for row in rows if row["client"] in {f"c{i}" for i in range(5)}]
    assert mine == ["c4", "c3", "c2", "c1", "c0"]
    assert "honest" not in {row["client"] for row in rows}  # never scored: not on the board

    paged, offset = [], 0
    while offset is not None:
        page = _admin(guard, "GET", f"/admin/clients?limit=2&offset={offset}").json()
        assert len(page["data"]) <= 2 and page["total"] == len(rows)
        paged += page["data"]
        offset = page["next_offset"]
    assert [row["client"] for row in paged] == [row["client"] for row in rows]

    c4 = next(row for row in rows if row["client"] == "c4")
    assert (c4["assessed"], c4["action"], c4["mode"], c4["tier"], c4["pin"]) == (
        "decoy",
        "decoy",
        "enforce",
        "watched",
        None,
    )
    decoyed = _admin(guard, "GET", "/admin/clients?assessed=decoy").json()
    assert "c4" in {row["client"] for row in decoyed["data"]}
    assert {row["assessed"] for row in decoyed["data"]} == {"decoy"}
    tightened = _admin(guard, "GET", "/admin/clients?assessed=tighten").json()["data"]
    assert [row["client"] for row in tightened] == ["c3"]
    _pin(guard, "c4", "allow", expires_in_s=600)
    pinned = _admin(guard, "GET", "/admin/clients?pinned=true").json()
    assert pinned["total"] == 1
    (row,) = pinned["data"]
    assert (row["client"], row["assessed"], row["action"]) == ("c4", "decoy", "pass")
    assert row["pin"]["action"] == "allow"

    # The top-k gauge: the board's highest TOP_CLIENTS clients, ranked by action then score.
    metrics = guard.metrics()
    series = [line for line in metrics.splitlines() if line.startswith("guard_client_risk{")]
    assert len(series) == TOP_CLIENTS, series
    for row in rows[:TOP_CLIENTS]:
        pinned_now = row["client"] == "c4"
        labels = {
            "client": row["client"],
            "assessed": row["assessed"],
            "action": "pass" if pinned_now else row["action"],
            "mode": "pinned" if pinned_now else "enforce",
        }
        assert metric_value(metrics, "guard_client_risk", **labels) == row["score"], labels
    _pin(guard, "c4", "auto")


def test_the_cli_wraps_the_admin_api(guard: GuardProcess, tmp_path: Path) -> None:
    assert _ask(guard, "cli", logprobs=True).status_code == 200
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")

    def cli(*args: str, key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_ADMIN_")}
        if key is not None:
            env["GUARD_ADMIN_KEY"] = key
        command = [sys.executable, "-m", "guard_server", "clients", *args, "--url", guard.url]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)

    shown = cli("show", "cli")
    assert shown.returncode == 0, shown.stderr
    assert "client   cli (tier watched)" in shown.stdout
    assert "the score calls for decoy" in shown.stdout and "action   decoy" in shown.stdout
    listed = cli("list", "--assessed", "decoy", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "cli" in {row["client"] for row in json.loads(listed.stdout)["data"]}
    table = cli("list", "--limit", "1", "--key-file", str(key_file), key=None)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["client", "tier", "risk"]
    assert len(table.stdout.splitlines()) == 2 and "more: --offset 1" in table.stderr

    pinned = cli("pin", "cli", "deny", "--for", "1h", "--note", "abuse ticket 9", "--by", "carol")
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.startswith("cli: pinned deny until ")
    assert _ask(guard, "cli").status_code == 403
    assert "pin      deny until" in cli("show", "cli").stdout
    assert cli("pin", "cli", "allow").returncode == 2  # no expiry
    unpinned = cli("pin", "cli", "auto")
    assert unpinned.returncode == 0 and "the score decides" in unpinned.stdout
    reset = cli("reset", "cli", "--note", "false positive")
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.startswith("reset cli (was risk ")
    assert _ask(guard, "cli").status_code == 200
    assert "action   pass" in cli("show", "cli").stdout
    audit = [r for r in _audit(guard) if r["event"] != "request" and r["client"] == "cli"]
    assert [(r["event"], r.get("action")) for r in audit] == [
        ("pin", "deny"),
        ("pin", "auto"),
        ("reset", None),
    ]
    assert (audit[0]["by"], audit[0]["note"]) == ("carol", "abuse ticket 9")
    assert audit[2]["note"] == "false positive" and "@" in audit[2]["by"]  # user@host

    wrong = cli("list", key="sk-wrong")
    assert wrong.returncode == 1 and "Incorrect admin key" in wrong.stderr
    assert cli("list", key=None).returncode == 2  # no key at all
    away = subprocess.run(
        [sys.executable, "-m", "guard_server", "clients", "list", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "GUARD_ADMIN_KEY": "x"},
    )  # fmt: skip
    assert away.returncode == 1 and "cannot reach the guard" in away.stderr


def test_pins_resets_and_the_board_reach_every_replica(
    tmp_path: Path, vllm_url: str, redis_server: RedisProcess
) -> None:
    state = {"backend": "redis", "redis_url": redis_server.url, "key_prefix": f"rv{time.time_ns()}"}
    a, b = (
        GuardProcess(_config(tmp_path / name, vllm_url, state), tmp_path / f"{name}.log").start()
        for name in ("a", "b")
    )
    try:
        truth = _content(_ask(b, TRUSTED_KEY))
        assert _content(_ask(b, "attacker", logprobs=True)) != truth  # decoyed, on B

        _pin(a, "attacker", "deny", expires_in_s=600)  # on A
        assert _ask(b, "attacker", logprobs=True).status_code == 403  # the next request on B
        _pin(a, "attacker", "allow", expires_in_s=1.5)
        assert _content(_ask(b, "attacker", logprobs=True)) == truth
        time.sleep(1.6)  # the allow pin expires on B too: the score decides
        assert _content(_ask(b, "attacker", logprobs=True)) != truth

        # The board: B's assessments reach A's list and both pods' top-k gauge.
        deadline = time.monotonic() + 10
        while True:
            rows = _admin(a, "GET", "/admin/clients?assessed=decoy").json()["data"]
            if [row["client"] for row in rows] == ["attacker"]:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
        for guard in (a, b):
            deadline = time.monotonic() + 10
            while not metric_value(guard.metrics(), "guard_client_risk", client="attacker"):
                assert time.monotonic() < deadline
                time.sleep(0.2)

        reset = _admin(a, "POST", "/admin/clients/attacker/reset")
        assert reset.status_code == 200 and reset.json()["before"]["assessed"] == "decoy"
        assert _content(_ask(b, "attacker")) == truth  # B scores a fresh profile at once
        assert _last_request(b, "attacker")["action"] == "pass"
        assert [r["event"] for r in _audit(a) if r["event"] != "request"] == [
            "pin",
            "pin",
            "reset",
        ]
    finally:
        a.stop()
        b.stop()


def test_every_worker_obeys_a_pin_and_exports_the_same_top(
    tmp_path: Path, vllm_url: str, redis_server: RedisProcess
) -> None:
    state = {"backend": "redis", "redis_url": redis_server.url, "key_prefix": f"rw{time.time_ns()}"}
    config = _config(tmp_path, vllm_url, state, secret={"env": "GUARD_TEST_SECRET"})
    env = {"GUARD_TEST_SECRET": "x" * 40}
    process = GuardProcess(config, tmp_path / "guard.log", workers=2, env=env).start()
    url = process.url
    try:

        def ask(logprobs: bool) -> int:  # a new connection each time: the kernel spreads them
            body: dict = {"model": "teacher", "messages": QUESTION, "max_tokens": 4}
            if logprobs:
                body.update(logprobs=True, top_logprobs=5)
            headers = {"Authorization": f"Bearer {KEYS['attacker']}"}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            return response.status_code

        assert [ask(logprobs=True) for _ in range(4)] == [200] * 4
        pin = httpx.put(
            f"{url}/admin/clients/attacker/pin",
            json={"action": "deny", "expires_in_s": 600},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert pin.status_code == 200, pin.text
        assert [ask(logprobs=True) for _ in range(12)] == [403] * 12

        # Every worker reads the same board: each scrape, whichever worker answers it,
        # shows the attacker (pinned: mode "pinned", action "block", assessed "decoy").
        labels = {"client": "attacker", "mode": "pinned", "action": "block", "assessed": "decoy"}
        deadline, seen = time.monotonic() + 15, 0
        while seen < 6:
            assert time.monotonic() < deadline, seen
            text = process.metrics()
            seen = seen + 1 if metric_value(text, "guard_client_risk", **labels) > 0 else 0
            time.sleep(0.1)
        assert metric_value(text, "guard_worker_up") == 2
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(30) == 0
        finally:
            process.stop()
