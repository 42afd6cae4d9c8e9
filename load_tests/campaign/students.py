"""The attackers' students: trained on what each collected, scored on held-out problems."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson

from guard_server.teacher import task
from load_tests.campaign.config import CampaignConfig
from load_tests.campaign.phase import PhaseResult


def train_students(
    results: list[PhaseResult],
    cfg: CampaignConfig,
    tokenizer_dir: Path,
    cache: Path,
    actors: tuple[str, ...] | None = None,
) -> None:
    """Train one student per phase and attacker on what it collected; store the accuracy.

    The student is ``load_tests.lab.student`` (the teacher's tokenizer, a fresh small
    Llama, a fixed number of optimiser steps), evaluated by greedy exact match on held-out
    problems that no attacker asked. Pairs are sorted first, so the result depends only on
    the collected set; results are kept in ``cache`` by a hash of that set and the student
    settings, so identical data (e.g. a phase in which nothing was decoyed) trains once.
    ``actors`` limits training to those attackers.
    """
    import torch

    from load_tests.lab import student

    torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))  # taskset-aware
    tokenizer = student.load_tokenizer(tokenizer_dir)
    heldout = task.make_problems(cfg.eval_n, seed=1, split="heldout")
    student_cfg = student.StudentConfig()
    student_cfg = replace(
        student_cfg,
        steps=cfg.student_steps or student_cfg.steps,
        batch=cfg.student_batch or student_cfg.batch,
    )
    known: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    for result in results:
        for actor, pairs in result.pairs.items():
            if actors is not None and actor not in actors:
                continue
            data = sorted(pairs)
            key = hashlib.sha256(
                orjson.dumps([data, asdict(student_cfg), cfg.seed, cfg.eval_n, str(tokenizer_dir)])
            ).hexdigest()
            if key not in known:
                acc, seconds = 0.0, 0.0
                if data:
                    acc, seconds = student.timed_run(
                        data, heldout, tokenizer, student_cfg, cfg.seed
                    )
                known[key] = {"accuracy": acc, "seconds": round(seconds, 1)}
                # Merge with what is on disk: runs for other actors may share the cache.
                on_disk = json.loads(cache.read_text()) if cache.exists() else {}
                cache.write_text(json.dumps({**on_disk, **known}, indent=1))
            entry = result.summary["attackers"][actor]
            entry["student_accuracy"] = known[key]["accuracy"]
            entry["student_seconds"] = known[key]["seconds"]
            entry["student"] = {"steps": student_cfg.steps, "batch": student_cfg.batch}
            print(
                f"[{result.phase}] student of {actor} ({len(data)} pairs): "
                f"{entry['student_accuracy']:.3f}",
                flush=True,
            )
