"""The benchmark harness runs end to end (``benchmarks.run --quick``): harness, not speed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from guard_server.testing import REPO

TOOLS = ("wrk", "hey", "redis-server")


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason="needs wrk, hey and redis-server (scripts/install-bench-tools.sh)",
)
def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)]
    if os.environ.get("GUARD_BENCH_SMOKE_LITELLM") != "1":
        # LiteLLM (when .bench-venv exists) needs ~15 s just to start; opt in with the variable.
        args.append("--no-litellm")
    process = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the run stops every process it started
        output, _ = process.communicate(timeout=60)
        pytest.fail("benchmarks.run --quick did not finish in 240 s:\n" + output[-4000:])
    assert process.returncode == 0, output[-4000:]

    results = json.loads((out / "results.json").read_text())
    for key in (
        "meta",
        "upstream_capacity",
        "saturation",
        "fixed_rate",
        "latency_c1",
        "stream_timing",
        "profile",
        "scale",
        "e2e_vllm",
        "targets",
    ):
        assert key in results, key
    assert results["meta"]["errors"] == {}
    assert {"nproc", "cpu_model", "python", "aiohttp", "uvloop"} <= set(results["meta"]["machine"])
    labels = {row["label"] for row in results["saturation"]}
    assert {"direct (fake upstream)", "guard pass-through", "guard default policy"} <= labels
    assert {"guard default + limits, redis", "guard pass-through, 2 workers"} <= labels
    for row in results["saturation"]:
        assert row["requests"] > 0, row  # errors (timeouts) can happen on a loaded machine
        assert {"rps", "p50_ms", "p90_ms", "p99_ms", "cpu_cores"} <= set(row)
    assert results["fixed_rate"]["rate_rps"] > 0
    assert all(row["n"] > 0 for row in results["latency_c1"]["rows"])
    stream = {row["label"]: row for row in results["stream_timing"]["rows"]}
    assert stream["guard pass-through"]["chunks_seen"] == results["stream_timing"]["chunks"]
    assert "added_per_chunk_p50_ms" in stream["guard default policy"]
    assert [row["clients"] for row in results["scale"]["rows"]] == [1, 300]
    assert results["scale"]["rows"][1]["populate"]["statuses"] == {"200": 300}
    assert {t["target"] for t in results["targets"]} >= {"default policy cost"}
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown and "## Saturation" in markdown


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_review_cost_quick_run_and_pins_reach_the_other_guard() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.review_cost", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert len(report["plan_stage_ns"]) == 3
    assert set(report["latency_c1"]) == {"after memory", "after redis"}
    propagation = report["propagation"]
    assert propagation["next_request_on_b_obeyed"] == propagation["pins"] == 10


def test_request_stages_reports_every_stage() -> None:
    """``benchmarks.request_stages`` (in process, no tools needed) measures each stage."""
    from benchmarks.request_stages import _run

    args = type("Args", (), {"clients": "pass,default", "requests": 40, "body": "chat"})()
    result = _run(None, args)  # type: ignore[arg-type]
    for client in ("pass", "default"):
        stages = result[client]
        assert {"policy", "score", "plan", "transform", "total"} <= stages.keys()
        assert all(value >= 0 for value in stages.values())
        assert stages["total"] > 0
    assert result["pass"]["score"] < result["default"]["score"]  # the pass tier scores nothing
