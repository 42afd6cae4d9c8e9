"""The guard in front of real vLLM (CPU) on the bundled teacher."""

from __future__ import annotations

import json
from typing import Any

from benchmarks import loadgen
from benchmarks.loadgen import summary_ms
from benchmarks.run.bench import KEYS, Bench
from guard_server.testing import (
    DEFAULT_POLICY,
    vllm_process,
)


def phase_vllm(bench: Bench) -> dict[str, Any]:
    """The guard in front of real vLLM (CPU) on the bundled teacher, when its weights exist."""
    from guard_server.teacher import MODEL_DIR
    from guard_server.teacher.task import completion_prompt, make_problems

    model_dir = bench.options.vllm_model or MODEL_DIR
    if not (model_dir / "config.json").exists():
        return {"skipped": f"no model at {model_dir} (config.json missing: not trained yet)"}
    o = bench.options
    vllm = vllm_process(model_dir, bench.log("vllm"))
    vllm.start()
    guard = None
    try:
        startup = vllm.wait_healthy(600)
        policies = [DEFAULT_POLICY, bench.write_policy()]
        config = bench.write_guard_config("guard-vllm", vllm.url, policies, {})
        guard = bench.start(bench.guard(config, bench.log("guard_vllm"), None, 1))
        url = guard.url
        guard.wait_ready()
        prompt = completion_prompt(make_problems(1, 5, "heldout")[0].question)
        body = bench.work / "body_vllm.json"
        body.write_text(
            json.dumps({"model": "teacher", "prompt": prompt, "max_tokens": 16, "temperature": 0})
        )
        specs = [
            {"name": "direct vLLM", "url": vllm.url, "path": "/v1/completions",
             "body_file": str(body)},
            {"name": "guard pass-through", "url": url, "path": "/v1/completions",
             "key": KEYS["pass"], "body_file": str(body)},
            {"name": "guard default policy", "url": url, "path": "/v1/completions",
             "key": KEYS["default"], "body_file": str(body)},
        ]  # fmt: skip
        n = 20 if o.quick else 200
        data = loadgen.python_client(
            "paired",
            ["--targets", str(bench.write_targets("vllm", specs)), "--requests", str(n),
             "--warmup", "5", "--max-seconds", "600"],
            None,
            timeout_s=700,
        )["latency_s"]  # fmt: skip
        direct = summary_ms(data["direct vLLM"])
        rows = []
        for spec in specs:
            row = {"label": spec["name"], **summary_ms(data[spec["name"]])}
            if spec["name"] != "direct vLLM":
                row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
            rows.append(row)
        saturation = []
        for name, target, key in (("direct vLLM", vllm.url, None), ("guard", url, KEYS["pass"])):
            result = loadgen.wrk(
                target,
                body_file=body,
                key=key,
                path="/v1/completions",
                concurrency=8,
                duration_s=o.duration_s,
            )
            result["label"] = name
            saturation.append(result)
        return {
            "model_dir": str(model_dir),
            "vllm_startup_s": startup,
            "latency_c1": rows,
            "requests": n,
            "saturation_c8": saturation,
        }
    finally:
        if guard is not None:
            bench.stop(guard)
        vllm.stop()
