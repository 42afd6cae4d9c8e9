"""One phase: a guard in front of vLLM, the campaign driven through it, summarized and saved."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard_server.teacher import task
from guard_server.testing import (
    DEFAULT_POLICY,
    free_port,
    running_vllm,
    vllm_process,
)
from load_tests.campaign.analysis import (
    admin_reports,
    attach_audit,
    summarize_attacker,
    summarize_honest,
    timing_summary,
)
from load_tests.campaign.config import (
    PORTS,
    CampaignConfig,
    campaign_thresholds,
    write_guard_config,
)
from load_tests.campaign.driver import Driver, Outcome
from load_tests.checkout import Checkout, guard_process
from load_tests.simulators import Simulator


@dataclass(slots=True)
class PhaseResult:
    """Everything one phase produced."""

    phase: str
    summary: dict[str, Any]
    pairs: dict[str, list[tuple[str, str]]]  # attacker -> (completion prompt, answer) pairs


def run_phase(
    phase: str,
    cfg: CampaignConfig,
    vllm_url: str,
    out: Path,
    sims: list[Simulator],
    checkout: Checkout | None = None,
) -> PhaseResult:
    """Start a guard for ``phase`` (``checkout``'s, if given), drive the campaign through
    it, and summarize."""
    directory = out / phase
    clients = [c for sim in sims for c in sim.clients]
    policy = checkout.policy if checkout else DEFAULT_POLICY
    config = write_guard_config(directory, vllm_url, clients, phase, cfg, policy)
    (directory / "audit.jsonl").unlink(missing_ok=True)
    thresholds = campaign_thresholds(cfg.thresholds)
    guard = guard_process(checkout, config, directory / "guard.log", port=free_port(PORTS))
    with guard:
        print(f"[{phase}] guard on {guard.url}; driving {len(sims)} actors", flush=True)
        started = time.monotonic()
        driver = Driver(guard.url, cfg.compression, cfg.deadline_real_s)
        outcomes = asyncio.run(asyncio.wait_for(driver.run(sims), cfg.deadline_real_s + 180.0))
        real_s = time.monotonic() - started
        admin = asyncio.run(admin_reports(guard.url, clients))
    unmatched = attach_audit(outcomes, directory / "audit.jsonl", thresholds)
    by_actor: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_actor[outcome.actor].append(outcome)
    honest = [s for s in sims if s.role == "honest"]
    summary = {
        "phase": phase,
        "thresholds": thresholds if phase == "defended" else None,
        "timing": timing_summary(outcomes, real_s),
        "audit_unmatched": unmatched,
        "honest": summarize_honest(honest, [o for s in honest for o in by_actor[s.name]], admin),
        "attackers": {
            s.name: summarize_attacker(s, by_actor[s.name], admin)
            for s in sims
            if s.role == "attacker"
        },
    }
    pairs = {
        s.name: [
            (task.completion_prompt(problem.question), " " + text.strip())
            for o in by_actor[s.name]
            if o.status == 200 and o.query.collect
            for problem, text in o.pairs()
        ]
        for s in sims
        if s.role == "attacker"
    }
    print(f"[{phase}] done in {real_s:.0f} s: {summary['timing']}", flush=True)
    return PhaseResult(phase, summary, pairs)


def save_phase(result: PhaseResult, meta: dict[str, Any], out: Path) -> None:
    """Write the phase's summary (``<phase>.json``) and collected pairs (``<phase>/pairs-*``)."""
    (out / result.phase).mkdir(parents=True, exist_ok=True)
    for actor, pairs in result.pairs.items():
        lines = (json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs)
        (out / result.phase / f"pairs-{actor}.jsonl").write_text("".join(lines))
    payload = {"meta": meta, **result.summary}
    (out / f"{result.phase}.json").write_text(json.dumps(payload, indent=2) + "\n")


def load_phase(phase: str, out: Path) -> PhaseResult:
    """A phase saved by :func:`save_phase`."""
    summary = json.loads((out / f"{phase}.json").read_text())
    summary.pop("meta")
    pairs = {}
    for actor in summary["attackers"]:
        path = out / phase / f"pairs-{actor}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        pairs[actor] = [(row["prompt"], row["answer"]) for row in rows]
    return PhaseResult(phase, summary, pairs)


def run_phases(
    phases: list[str] | tuple[str, ...],
    cfg: CampaignConfig,
    vllm_url: str | None,
    teacher: Path,
    out: Path,
    sims: list[Simulator],
    meta: dict[str, Any],
    checkout: Checkout | None = None,
) -> list[PhaseResult]:
    """Run the phases (starting vLLM unless ``vllm_url`` is given) and save each one."""
    with contextlib.ExitStack() as running:
        if vllm_url is None:
            vllm = vllm_process(teacher, out / "vllm.log", ports=PORTS)
            seconds = running.enter_context(running_vllm(vllm))
            print(f"vLLM on {vllm.url} healthy after {seconds:.0f} s", flush=True)
            vllm_url = vllm.url
        results = []
        for phase in phases:
            result = run_phase(phase, cfg, vllm_url.rstrip("/"), out, sims, checkout)
            save_phase(result, meta, out)
            results.append(result)
        return results
