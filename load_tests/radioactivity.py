"""Watermark quality cost, plugin-noise cost and radioactivity, measured through a real guard.

Two teachers: the bundled arithmetic teacher (``--teacher arithmetic``: near-certain answers,
almost nothing to mark) and the lab's storyteller (``--teacher storyteller``: stories with about
four bits of choice per word, see ``load_tests/lab/story.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from guard_server.config.loader import load_settings
from guard_server.pipeline.auth import hash_key
from guard_server.teacher import MODEL_DIR, task
from guard_server.testing import (
    DEFAULT_POLICY,
    GuardProcess,
    running_vllm,
    vllm_process,
    write_config,
)
from guard_server.trace import tokenize, trace
from load_tests.lab import story
from load_tests.lab.train_storyteller import STORYTELLER_DIR

SECRET_ENV = "GUARD_RADIOACTIVITY_SECRET"
SECRET = "radioactivity-test-secret-0123456789abcdef"
SIGMAS = (0.5, 1.0, 2.0, 4.0)
OTHERS = 22
"""Bystander client keys: the trace must clear each of them."""
WATERMARK = {"enabled": True, "gamma": 0.25, "delta": 2.0}


@dataclass(frozen=True, slots=True)
class PromptSet:
    """Prompts, and how the texts answering them (in order) are scored."""

    prompts: list[str]
    score: Callable[[list[str]], dict[str, float]]


def arithmetic_prompts(n: int, seed: int, split: task.Split) -> PromptSet:
    """Addition problems; score: exact-match accuracy."""
    problems = task.make_problems(n, seed=seed, split=split)
    return PromptSet(
        [task.completion_prompt(p.question) for p in problems],
        lambda texts: {"accuracy": round(accuracy(problems, texts), 4)},
    )


def story_prompts(n: int, seed: int) -> PromptSet:
    """Story topics; score: share of word transitions the chain allows, and their NLL."""
    topics = story.topics(n, seed)

    def score(texts: list[str]) -> dict[str, float]:
        result = story.fidelity(topics, texts)
        return {"valid": round(result.valid, 4), "nll": round(result.nll, 4)}

    return PromptSet([story.prompt(t) for t in topics], score)


@dataclass(frozen=True, slots=True)
class Workload:
    """A teacher: its weights, answer length, prompt sets and sampling temperatures."""

    model_dir: Path
    max_tokens: int
    heldout: Callable[[int], PromptSet]
    train: Callable[[int], PromptSet]
    temperatures: tuple[float, ...]  # the teacher's, in the quality table
    student_temperature: float  # how the student's traced generations are decoded


WORKLOADS = {
    "arithmetic": Workload(
        MODEL_DIR,
        32,
        lambda n: arithmetic_prompts(n, 7, "heldout"),
        lambda n: arithmetic_prompts(n, 11, "train"),
        (0.0, 1.0),
        0.0,
    ),
    "storyteller": Workload(
        STORYTELLER_DIR,
        96,
        lambda n: story_prompts(n, 7),
        lambda n: story_prompts(n, 11),
        (1.0,),
        1.0,
    ),
}


def _tier(sampling: dict[str, Any]) -> dict[str, Any]:
    """The repo's ``default`` tier, detection off (it would add noise), plus ``sampling``."""
    base = yaml.safe_load(DEFAULT_POLICY.read_text())["tiers"]["default"]
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


def write_watermark_config(directory: Path, vllm_url: str, delta: float = 2.0) -> Path:
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
    upstream = {"guard_plugin": True, "timeouts": {"connect": 2, "read": 120, "total": 300}}
    return write_config(
        directory,
        [vllm_url],
        policies=[policy_path],
        upstream=upstream,
        secret={"env": SECRET_ENV},
    )


@contextlib.contextmanager
def watermark_guard(
    directory: Path, vllm_url: str, delta: float
) -> Iterator[tuple[GuardProcess, Path]]:
    """A running guard with :func:`write_watermark_config`'s tiers before ``vllm_url``, and
    its config.

    The fixed secret is in the environment while it runs (the previous value is restored).
    """
    previous = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = SECRET
    config = write_watermark_config(directory, vllm_url, delta)
    try:
        with GuardProcess(config, directory / "guard.log") as process:
            yield process, config
    finally:
        if previous is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = previous


def complete(
    base_url: str,
    key: str,
    prompts: list[str],
    temperature: float,
    workers: int = 32,
    max_tokens: int = 32,
    seeded: bool = False,
) -> list[str]:
    """``/v1/completions`` for each prompt through the guard, ``workers`` at a time.

    ``seeded``: prompt i is sent with ``seed`` i (the tier re-keys it per client), so that a
    run repeats exactly.
    """
    with httpx.Client(base_url=base_url, timeout=300) as http:

        def one(item: tuple[int, str]) -> str:
            index, prompt = item
            body: dict[str, Any] = {
                "model": "teacher",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
            if seeded:
                body["seed"] = index
            response = http.post(
                "/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            response.raise_for_status()
            return response.json()["choices"][0]["text"]

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, enumerate(prompts)))


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
        "others_abs_z_lt_2": sum(abs(s.z) < 2 for s in others),
    }


def measure_quality(
    workload: Workload, guard: GuardProcess, config: Path, model: Path, n: int, report
) -> None:
    """The teacher's quality per tier and temperature, and a trace of its watermarked text."""
    keys = clients()
    heldout = workload.heldout(n)
    for temperature in workload.temperatures:
        for cid in ("clean", "attacker", *(f"noise{s:g}" for s in SIGMAS)):
            texts = complete(
                guard.base_url,
                keys[cid],
                heldout.prompts,
                temperature,
                max_tokens=workload.max_tokens,
            )
            report(f"quality/{cid}/T={temperature:g}", heldout.score(texts))
            if cid == "attacker" and temperature == 1.0:
                report("trace/teacher_watermarked_T=1", trace_texts(config, texts, model))


def measure_students(
    workload: Workload,
    guard: GuardProcess,
    config: Path,
    model: Path,
    sizes: list[int],
    args: argparse.Namespace,
    work: Path,
    report,
) -> None:
    """Per client (attacker, clean) and N: collect N answers, train a student, trace it."""
    from load_tests.lab import lm, student

    tokenizer = student.load_tokenizer(model)
    train = workload.train(max(sizes))
    heldout = workload.heldout(args.heldout)
    cfg = student.StudentConfig(
        steps=args.steps, layers=args.student_layers, batch=args.student_batch
    )
    for cid in ("attacker", "clean"):
        answers = complete(
            guard.base_url, clients()[cid], train.prompts, 1.0, max_tokens=workload.max_tokens
        )
        report(f"collected/{cid}/quality", train.score(answers))
        for n in sizes:
            report(f"trace/{cid}_collected_{n}", trace_texts(config, answers[:n], model))
            started = time.monotonic()
            pairs = list(zip(train.prompts[:n], answers[:n], strict=True))
            net = student.train_student(pairs, tokenizer, cfg, log_every=250)
            report(f"student/{cid}/{n}/train_s", round(time.monotonic() - started, 1))
            generated = lm.generate(
                net,
                tokenizer,
                heldout.prompts,
                temperature=workload.student_temperature,
                max_new_tokens=workload.max_tokens,
            )
            (work / f"student-{cid}-{n}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in generated)
            )
            report(f"student/{cid}/{n}/heldout_quality", heldout.score(generated))
            report(f"trace/student_{cid}_{n}", trace_texts(config, generated, model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", choices=sorted(WORKLOADS), default="arithmetic")
    parser.add_argument("--model", type=Path, default=None, help="the teacher's weights")
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument(
        "--collect", default="2000", help="N answers the attacker takes (comma-separated: several)"
    )
    parser.add_argument("--steps", type=int, default=300, help="student optimiser steps")
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--student-batch", type=int, default=128)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-students", action="store_true")
    parser.add_argument("--vllm-url", default=None, help="reuse a running vLLM (with the plugin)")
    parser.add_argument("--delta", type=float, default=2.0, help="the attacker tier's delta")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.teacher]
    sizes = sorted(int(n) for n in args.collect.split(","))
    results: dict[str, Any] = {
        "teacher": args.teacher,
        "delta": args.delta,
        "collect": sizes,
        "steps": args.steps,
    }
    work = Path(tempfile.mkdtemp(prefix="radioactivity-"))
    model = work / "teacher"
    shutil.copytree(args.model or workload.model_dir, model)

    def report(name: str, value: Any) -> None:
        results[name] = value
        print(name, json.dumps(value), flush=True)

    with contextlib.ExitStack() as running:
        vllm_url = args.vllm_url
        if vllm_url is None:
            vllm = vllm_process(model, work / "vllm.log")
            running.enter_context(running_vllm(vllm))
            vllm_url = vllm.url
        guard, config = running.enter_context(watermark_guard(work, vllm_url, args.delta))
        if not args.skip_quality:
            measure_quality(workload, guard, config, model, args.heldout, report)
        if not args.skip_students:
            measure_students(workload, guard, config, model, sizes, args, work, report)
        results["workdir"] = str(work)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
