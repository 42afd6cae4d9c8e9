"""The command line: ``python -m load_tests.campaign`` runs the phases, students, report."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from guard_server.teacher import MODEL_DIR
from guard_server.testing import REPO
from load_tests.campaign.config import NOMINAL_LIMITS, PHASES, QUICK, CampaignConfig, population
from load_tests.campaign.phase import load_phase, run_phases, save_phase
from load_tests.campaign.report import markdown
from load_tests.campaign.students import train_students
from load_tests.checkout import Checkout
from load_tests.simulators.attackers import LowAndSlow


def main(argv: list[str] | None = None) -> None:
    """Run the campaign's phases, train the students, write the report."""
    ap = argparse.ArgumentParser(
        prog="python -m load_tests.campaign",
        description="Simulated honest users and extraction attackers against the guard: "
        "detection, false positives and the attackers' student accuracy, defended and "
        "undefended.",
    )
    ap.add_argument("--quick", action="store_true", help="a small population and budget")
    phase_group = ap.add_mutually_exclusive_group()
    phase_group.add_argument("--undefended", action="store_true", help="only the undefended run")
    phase_group.add_argument("--defended", action="store_true", help="only the defended run")
    ap.add_argument("--budget", type=int, help="queries per attacker")
    ap.add_argument("--honest", type=int, help="interactive honest users")
    ap.add_argument("--batch", type=int, help="honest batch users")
    ap.add_argument("--hydra-keys", type=int)
    ap.add_argument("--window-h", type=float, help="simulated hours")
    ap.add_argument("--compression", type=float, help="simulated seconds per real second")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--student-steps", type=int)
    ap.add_argument("--eval-n", type=int)
    ap.add_argument("--student-batch", type=int)
    ap.add_argument(
        "--student-actors",
        type=lambda text: tuple(text.split(",")),
        help="train students only for these attackers (comma-separated)",
    )
    ap.add_argument(
        "--thresholds",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        help="tighten,perturb,decoy,block for the defended tier (default: the policy's)",
    )
    ap.add_argument("--no-students", action="store_true", help="skip student training")
    ap.add_argument(
        "--students-only",
        action="store_true",
        help="train students on the pairs a previous run saved in --out",
    )
    ap.add_argument(
        "--kinds",
        type=lambda text: tuple(text.split(",")),
        help="attacker kinds to simulate (comma-separated; default: all)",
    )
    ap.add_argument(
        "--guard-checkout",
        type=Path,
        help="run the guard of this checkout (a git worktree of an earlier commit)",
    )
    ap.add_argument("--vllm-url", help="use this vLLM instead of starting one")
    ap.add_argument("--teacher", type=Path, default=MODEL_DIR, help="model dir (and tokenizer)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "campaign")
    args = ap.parse_args(argv)

    cfg = QUICK if args.quick else CampaignConfig()
    overrides = {
        name: getattr(args, name)
        for name in ("budget", "honest", "batch", "hydra_keys", "window_h", "compression",
                     "seed", "student_steps", "student_batch", "eval_n", "thresholds", "kinds")
        if getattr(args, name) is not None
    }  # fmt: skip
    cfg = replace(cfg, **overrides)
    phases = ["undefended"] if args.undefended else ["defended"] if args.defended else PHASES
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sims = population(cfg)
    slow = next((s for s in sims if isinstance(s, LowAndSlow)), None)
    if slow is not None:
        print(f"low-and-slow rate: {slow.rate_per_min():.1f}/min (static limit "
              f"{NOMINAL_LIMITS['requests_per_minute']}/min)", flush=True)  # fmt: skip

    meta = {"config": json.loads(json.dumps(asdict(cfg))), "teacher": str(args.teacher)}
    if args.students_only:
        results = [load_phase(p, out) for p in phases if (out / f"{p}.json").exists()]
    else:
        checkout = Checkout(args.guard_checkout) if args.guard_checkout else None
        results = run_phases(phases, cfg, args.vllm_url, args.teacher, out, sims, meta, checkout)
    if not args.no_students:
        train_students(results, cfg, args.teacher, out / "students.json", args.student_actors)
        for result in results:
            save_phase(result, meta, out)

    summaries = {}
    for phase in PHASES:
        path = out / f"{phase}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if _traffic(data["meta"]["config"]) == _traffic(meta["config"]):
                summaries[phase] = data
    report = markdown(meta, summaries)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"meta": meta, "phases": summaries}, indent=2))
    print(report)


def _traffic(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the traffic: a defended and an undefended run compare only if
    they agree on these (the thresholds apply to the defended phase alone)."""
    ignored = ("student_steps", "student_batch", "eval_n", "thresholds")
    return {k: v for k, v in config.items() if k not in ignored}
