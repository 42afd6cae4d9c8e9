"""The campaign report: tables of attackers, honest users, timing, and the targets."""

from __future__ import annotations

import json
from typing import Any


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: int | None) -> str:
    return "never" if value is None else f"{value:,}"


def targets(summaries: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """Each target, what was reached, and whether it is met (``None``: not measured)."""
    rows: list[tuple[str, str, bool | None]] = []
    defended = summaries.get("defended")
    undefended = summaries.get("undefended")
    if defended is None:
        return rows
    honest = defended["honest"]
    rows.append((
        "≤ 0.5% of honest clients flagged (flagged, throttled or decoyed)",
        f"{len(honest['false_positive_clients'])}/{honest['clients']} "
        f"= {_pct(honest['false_positive_rate'], 2)}",
        honest["false_positive_rate"] <= 0.005,
    ))  # fmt: skip
    rows.append((
        "zero honest requests decoyed",
        f"{honest['decoyed_requests']} of {honest['requests']}",
        honest["decoyed_requests"] == 0,
    ))  # fmt: skip
    for name in ("bulk", "hydra"):
        attacker = defended["attackers"].get(name)
        if attacker is None:
            continue
        first = attacker["first_flagged"]
        rows.append((
            f"{name} flagged within 2,000 of its queries",
            f"at query {_num(first)}",
            first is not None and first <= 2000,
        ))  # fmt: skip
    batching = defended["attackers"].get("batch-bulk")
    if batching is not None:
        first = batching.get("first_flagged_answers")
        rows.append((
            "batch-bulk flagged within 2,000 of its answers (prompts × n)",
            f"at answer {_num(first)} (request {_num(batching['first_flagged'])})",
            first is not None and first <= 2000,
        ))  # fmt: skip
    if undefended is None:
        return rows
    for name, attacker in defended["attackers"].items():
        base = undefended["attackers"].get(name, {}).get("student_accuracy")
        acc = attacker.get("student_accuracy")
        if base is None or acc is None:
            rows.append((f"{name}: student accuracy ≥ 50% lower than undefended", "—", None))
            continue
        drop = (base - acc) / base if base > 0 else 0.0
        rows.append((
            f"{name}: student accuracy ≥ 50% lower (relative) than undefended",
            f"{_pct(acc)} vs {_pct(base)} (−{_pct(drop, 0)})",
            base > 0 and drop >= 0.5,
        ))  # fmt: skip
    delta = defended["honest"]["accuracy"] - undefended["honest"]["accuracy"]
    rows.append((
        "honest answer accuracy within 0.5 point of undefended",
        f"{_pct(defended['honest']['accuracy'], 2)} vs "
        f"{_pct(undefended['honest']['accuracy'], 2)} ({100 * delta:+.2f} points)",
        abs(delta) <= 0.005,
    ))  # fmt: skip
    return rows


def markdown(meta: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> str:
    """The report: attackers, honest users, timeline fidelity, targets."""
    cfg = meta["config"]
    lines = [
        f"Campaign: {cfg['honest']} interactive users + {cfg['batch']} batch jobs, attackers "
        f"with a budget of {cfg['budget']:,} queries each (hydra: {cfg['hydra_keys']} keys), "
        f"{cfg['window_h']:g} simulated hours compressed {cfg['compression']:g}× "
        f"(seed {cfg['seed']}, teacher `{meta['teacher']}`).",
    ]
    defended = summaries.get("defended")
    if defended and defended.get("thresholds"):
        t = defended["thresholds"]
        lines.append(
            f"Defended tier thresholds: tighten {t['tighten']:g}, perturb {t['perturb']:g}, "
            f"decoy {t['decoy']:g}, block {t['block']:g}."
        )
    students = {
        json.dumps(a["student"]) for s in summaries.values() for a in s["attackers"].values()
        if "student" in a
    }  # fmt: skip
    for spec in sorted(students):
        student = json.loads(spec)
        lines.append(
            f"Students: `load_tests.lab.student`, {student['steps']} steps × batch "
            f"{student['batch']}, greedy exact match on {cfg['eval_n']} held-out problems."
        )
    lines += [
        "",
        "| attacker | phase | answered | first flagged at | first perturb+ at | first decoy at "
        "| collected decoyed | collected perturbed | wrong answers | keys flagged (end) "
        "| student accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = sorted({n for s in summaries.values() for n in s["attackers"]})
    for name in names:
        for phase, summary in summaries.items():
            a = summary["attackers"].get(name)
            if a is None:
                continue
            lines.append(
                f"| {name} | {phase} | {a['answered']:,} | {_num(a['first_flagged'])} "
                f"| {_num(a['first_perturbed'])} | {_num(a['first_decoyed'])} "
                f"| {_pct(a['decoyed_share'])} | {_pct(a['perturbed_share'])} "
                f"| {_pct(a['wrong_share'])} | {a['keys_flagged_final']}/{a['keys']} "
                f"| {_pct(a.get('student_accuracy'))} |"
            )
    lines += [
        "",
        "| honest users | clients | flagged | throttled (429) | decoyed clients "
        "| false-positive rate | requests | decoyed requests | answer accuracy "
        "| single-turn accuracy | max risk seen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, summary in summaries.items():
        h = summary["honest"]
        lines.append(
            f"| {phase} | {h['clients']} | {h['flagged']} | {h['throttled']} "
            f"| {h['decoyed_clients']} | {_pct(h['false_positive_rate'], 2)} | {h['requests']:,} "
            f"| {h['decoyed_requests']} | {_pct(h['accuracy'], 2)} "
            f"| {_pct(h.get('accuracy_single_turn'), 2)} | {h['max_risk']:.3f} |"
        )
    lines += [
        "",
        "| phase | real seconds | requests | requests/s | latency p50 / p99 "
        "| open-loop lateness p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase, summary in summaries.items():
        t = summary["timing"]
        lines.append(
            f"| {phase} | {t['real_seconds']:,} | {t['requests']:,} | {t['requests_per_real_s']} "
            f"| {1000 * t['latency_p50_s']:.0f} / {1000 * t['latency_p99_s']:.0f} ms "
            f"| {1000 * t['open_loop_lateness_p50_s']:.0f} / "
            f"{1000 * t['open_loop_lateness_p99_s']:.0f} ms |"
        )
    rows = targets(summaries)
    if rows:
        lines += ["", "| target | reached | met |", "|---|---|---|"]
        for name, reached, met in rows:
            verdict = "—" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {name} | {reached} | {verdict} |")
    return "\n".join(lines) + "\n"
