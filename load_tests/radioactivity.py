"""Watermark quality cost, plugin-noise cost and radioactivity, measured through a real guard."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from guard_server.config.loader import load_settings
from guard_server.pipeline.auth import hash_key
from guard_server.teacher import task
from guard_server.trace import tokenize, trace
from guard_server.upstream.vllm_process import VllmProcess
from tests.processes import GuardProcess

REPO = Path(__file__).resolve().parents[1]
SECRET_ENV = "GUARD_RADIOACTIVITY_SECRET"
SECRET = "radioactivity-test-secret-0123456789abcdef"
SIGMAS = (0.5, 1.0, 2.0, 4.0)
OTHERS = 22
WATERMARK = {"enabled": True, "gamma": 0.25, "delta": 2.0}


def _tier(sampling: dict[str, Any]) -> dict[str, Any]:
    """The repo's ``default`` tier, detection off (it would add noise), plus ``sampling``."""
    base = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())["tiers"]["default"]
    base = {**base, "detection": {"enabled": False}, "limits": {}}
    if sampling:
        base["sampling"] = sampling
    return base


def clients() -> dict[str, str]:
    """Client id -> API key: the attacker, a clean client, noise clients and bystanders."""
    keys = {"attacker": "sk-rt-attacker", "clean": "sk-rt-clean"}
    keys.update({f"noise{s:g}": f"sk-rt-noise-{s:g}" for s in SIGMAS})
    keys.update({f"other{i:02d}": f"sk-rt-other-{i:02d}" for i in range(OTHERS)})
    return keys


def write_config(directory: Path, vllm_url: str, delta: float = 2.0) -> Path:
    """Policy and guard config: watermark tier, plain tier, one tier per noise sigma."""
    tiers = {"wm": _tier({"watermark": {**WATERMARK, "delta": delta}}), "plain": _tier({})}
    tiers.update({f"noise{s:g}": _tier({"noise": {"sigma": s}}) for s in SIGMAS})
    tier_of = {"attacker": "wm", "clean": "plain"}
    tier_of.update({f"noise{s:g}": f"noise{s:g}" for s in SIGMAS})
    policy = {
        "tiers": tiers,
        "clients": {
            cid: {"tier": tier_of.get(cid, "wm"), "keys": [hash_key(key)]}
            for cid, key in clients().items()
        },
    }
    policy_path = directory / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy))
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "secret": {"env": SECRET_ENV},
        "upstreams": {
            "teacher": {
                "urls": [vllm_url],
                "guard_plugin": True,
                "timeouts": {"connect": 2, "read": 120, "total": 300},
            }
        },
        "policies": [str(policy_path)],
    }
    path = directory / "guard.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def complete(
    base_url: str, key: str, prompts: list[str], temperature: float, workers: int = 32
) -> list[str]:
    """``/v1/completions`` for each prompt through the guard, ``workers`` at a time."""
    with httpx.Client(base_url=base_url, timeout=300) as http:

        def one(prompt: str) -> str:
            body = {
                "model": "teacher",
                "prompt": prompt,
                "max_tokens": 32,
                "temperature": temperature,
            }
            response = http.post(
                "/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            response.raise_for_status()
            return response.json()["choices"][0]["text"]

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, prompts))


def accuracy(problems: list[task.Problem], texts: list[str]) -> float:
    return sum(task.check(p, t) for p, t in zip(problems, texts, strict=True)) / len(problems)


def trace_texts(config: Path, texts: list[str], tokenizer_dir: Path) -> dict[str, Any]:
    """``guard-server trace`` on ``texts``: who is named, the attacker's and others' scores."""
    settings = load_settings(config)
    verdict = trace(settings, tokenize(texts, tokenizer_dir), 0.25, 1e-6)
    by_client = {item.client: item.score for item in verdict.scores}
    others = [by_client[c] for c in by_client if c.startswith("other")]
    attacker = by_client["attacker"]
    return {
        "named": verdict.named,
        "clients_tested": len(verdict.scores),
        "attacker": {
            "z": round(attacker.z, 2),
            "p": attacker.p_value,
            "scored": attacker.scored,
            "green": attacker.green,
        },
        "others_p_gt_0.01": sum(s.p_value > 0.01 for s in others),
        "others_max_abs_z": round(max(abs(s.z) for s in others), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=REPO / "guard_server/teacher/model")
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--collect", type=int, default=2000, help="N answers the attacker takes")
    parser.add_argument("--steps", type=int, default=300, help="student optimiser steps")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-students", action="store_true")
    parser.add_argument("--vllm-url", default=None, help="reuse a running vLLM (with the plugin)")
    parser.add_argument("--delta", type=float, default=2.0, help="the attacker tier's delta")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    os.environ[SECRET_ENV] = SECRET
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="radioactivity-"))
    model = work / "teacher"
    shutil.copytree(args.model, model)
    vllm = None
    guard = None
    try:
        vllm_url = args.vllm_url
        if vllm_url is None:
            vllm = VllmProcess(model, "teacher", log_path=work / "vllm.log")
            vllm.start()
            vllm.wait_healthy(600)
            vllm_url = vllm.url
        config = write_config(work, vllm_url, args.delta)
        guard = GuardProcess(config, work / "guard.log").start()
        guard.wait_ready(60)
        keys = clients()
        heldout = task.make_problems(args.heldout, seed=7, split="heldout")
        prompts = [task.completion_prompt(p.question) for p in heldout]

        def report(name: str, value: Any) -> None:
            results[name] = value
            print(name, json.dumps(value), flush=True)

        if not args.skip_quality:
            for temperature in (0.0, 1.0):
                for cid in ("clean", "attacker"):
                    texts = complete(guard.base_url, keys[cid], prompts, temperature)
                    report(f"accuracy/{cid}/T={temperature:g}", accuracy(heldout, texts))
                    if cid == "attacker" and temperature == 1.0:
                        report("trace/teacher_watermarked_T=1", trace_texts(config, texts, model))
                for sigma in SIGMAS:
                    texts = complete(guard.base_url, keys[f"noise{sigma:g}"], prompts, temperature)
                    report(f"accuracy/noise{sigma:g}/T={temperature:g}", accuracy(heldout, texts))
        if not args.skip_students:
            from load_tests.lab import student

            tokenizer = student.load_tokenizer(model)
            train = task.make_problems(args.collect, seed=11, split="train")
            train_prompts = [task.completion_prompt(p.question) for p in train]
            cfg = student.StudentConfig(steps=args.steps)
            for cid in ("attacker", "clean"):
                answers = complete(guard.base_url, keys[cid], train_prompts, 1.0)
                report(f"collected/{cid}/teacher_accuracy", accuracy(train, answers))
                report(f"trace/{cid}_collected", trace_texts(config, answers, model))
                started = time.monotonic()
                net = student.train_student(
                    list(zip(train_prompts, answers, strict=True)), tokenizer, cfg, log_every=100
                )
                report(f"student/{cid}/train_s", round(time.monotonic() - started, 1))
                from load_tests.lab import lm

                generated = lm.greedy_generate(net, tokenizer, prompts)
                (work / f"student-{cid}.jsonl").write_text(
                    "".join(json.dumps({"text": t}) + "\n" for t in generated)
                )
                report(f"student/{cid}/heldout_accuracy", accuracy(heldout, generated))
                report(f"trace/student_{cid}", trace_texts(config, generated, model))
        results["delta"] = args.delta
        results["collect"] = args.collect
        results["steps"] = args.steps
        results["workdir"] = str(work)
    finally:
        if guard is not None:
            guard.stop()
        if vllm is not None:
            vllm.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
