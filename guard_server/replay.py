"""``guard-server replay``: re-score a recorded audit log under another policy.

Each scored request's audit line carries the features detection counted (prompt hashes,
fingerprint, logprob count, ``logit_bias``, when it was scored; never prompt text) and the
end user it named. The replay folds them, in time order, into an in-process state store
whose clock is each request's scoring time, and assesses every request as the guard's
scoring stage does (the key's scope and the end user's) under the tiers of the given policy
files. It reports, per client and per end user, the actions the score called for before (the
line's ``assessed``) and after, and what would change; with ``--out`` also a CSV of both
risks over time and an SVG plot of risk against time for the clients whose action changes,
with the new thresholds (an SVG written here: matplotlib is not a dependency).

What it does not replay: pins (an operator's pin decides ``action`` whatever the score: the
report compares what the score called for), rate limits, and requests the log does not
have (lines without ``features``: unscored requests, logs from before the field existed, or
``audit.only_flagged``). The live guard reassesses an established client one request in
four; the replay assesses every request, so its first change can come up to three requests
earlier.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from guard_server.config.schema import PolicyFile, TierPolicy
from guard_server.detection.end_users import NEWCOMER_MARK, assess_key, decide, score_with_end_user
from guard_server.detection.features import RequestFeatures
from guard_server.detection.scoring import ACTIONS
from guard_server.state.memory import MemoryStore

_RANK = {action: rank for rank, action in enumerate(ACTIONS)}
_PLOTTED = 8  # clients in the plot at most
_DEFAULT_TIER = "default"
_CSV_COLUMNS = (
    "ts", "client", "end_user", "risk_before", "risk_after", "assessed_before",
    "assessed_after", "action_after", "decided_by",
)  # fmt: skip


class ReplayError(Exception):
    """A policy or audit file the replay cannot use."""


@dataclass(slots=True)
class Policies:
    """The tiers and client entries of the policy files the replay scores under."""

    tiers: dict[str, TierPolicy]
    client_tiers: dict[str, str]
    client_modes: dict[str, str]

    @classmethod
    def load(cls, paths: list[Path]) -> Policies:
        """Read and validate policy files (``tiers:`` and/or ``clients:``), later files
        overriding earlier ones, as the guard's ``policies:`` list does."""
        tiers: dict[str, TierPolicy] = {}
        client_tiers: dict[str, str] = {}
        client_modes: dict[str, str] = {}
        for path in paths:
            try:
                data = yaml.safe_load(path.read_text()) or {}
                policy = PolicyFile.model_validate(data)
            except (OSError, yaml.YAMLError, ValidationError) as exc:
                raise ReplayError(f"{path}: {exc}") from exc
            tiers.update(policy.tiers)
            for client, entry in policy.clients.items():
                client_tiers[client] = entry.tier
                if entry.detection_mode:
                    client_modes[client] = entry.detection_mode
        if not tiers:
            raise ReplayError("the policy files define no tiers")
        return cls(tiers, client_tiers, client_modes)

    def tier_of(self, client: str, recorded_tier: str) -> tuple[str, TierPolicy]:
        """The client's tier under these policies: its own entry's, else the tier the log
        recorded, else ``default``."""
        for name in (self.client_tiers.get(client), recorded_tier, _DEFAULT_TIER):
            if name is not None and name in self.tiers:
                return name, self.tiers[name]
        raise ReplayError(f"client {client!r}: no tier {recorded_tier!r} and no default tier")

    def mode_of(self, client: str, tier: TierPolicy) -> str:
        """``enforce`` or ``shadow`` for the client under these policies."""
        return self.client_modes.get(client, tier.detection.mode)


@dataclass(slots=True)
class ScopeReport:
    """One client's (or one end user's) requests, before and after."""

    client: str
    end_user: str | None
    requests: int = 0
    before: Counter[str] = field(default_factory=Counter)
    after: Counter[str] = field(default_factory=Counter)
    changed: int = 0
    first_change: int | None = None  # the scope's request number (from 1)
    max_before: float = 0.0
    max_after: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as ``replay.json`` has it."""
        return {
            "client": self.client,
            "end_user": self.end_user,
            "requests": self.requests,
            "before": dict(sorted(self.before.items(), key=lambda kv: _RANK[kv[0]])),
            "after": dict(sorted(self.after.items(), key=lambda kv: _RANK[kv[0]])),
            "changed": self.changed,
            "first_change": self.first_change,
            "max_risk_before": round(self.max_before, 4),
            "max_risk_after": round(self.max_after, 4),
        }


@dataclass(slots=True)
class Point:
    """One replayed request."""

    ts: float
    client: str
    tier: str  # the client's tier under the replayed policies
    end_user: str | None
    risk_before: float | None
    risk_after: float
    assessed_before: str
    assessed_after: str
    action_after: str  # what enforcement would do (pass in shadow mode)
    scope: str  # whose score decided after: "key", "end_user" or "newcomers"


def read_audit(paths: list[Path]) -> tuple[list[dict[str, Any]], int]:
    """The scored request lines of the audit files, in time order, and how many request
    lines had no ``features`` (not replayable)."""
    lines: list[dict[str, Any]] = []
    skipped = 0
    for path in paths:
        try:
            raw = path.read_bytes().splitlines()
        except OSError as exc:
            raise ReplayError(f"{path}: {exc}") from exc
        for number, line in enumerate(raw, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ReplayError(f"{path}:{number}: not a JSON line ({exc})") from exc
            if record.get("event") != "request":
                continue
            if not record.get("features"):
                skipped += 1
                continue
            lines.append(record)
    lines.sort(key=lambda record: record["features"].get("at", record["ts"]))
    return lines, skipped


def _features(record: dict[str, Any], max_top: int) -> RequestFeatures:
    seen = record["features"]
    count = seen.get("logprobs")
    wants = count is not None
    return RequestFeatures(
        prompt_hashes=tuple(seen["prompts"]),
        fingerprint=seen["fingerprint"],
        wants_logprobs=wants,
        max_top=wants and (count == -1 or count >= max_top),
        logit_bias=bool(seen.get("logit_bias")),
        logprobs=count,
    )


async def _replay(lines: list[dict[str, Any]], policies: Policies) -> list[Point]:
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0])
    points: list[Point] = []
    for record in lines:
        clock[0] = float(record["features"].get("at", record["ts"]))
        client = record["client"]
        tier_name, tier = policies.tier_of(client, record.get("tier", _DEFAULT_TIER))
        detection = tier.detection
        end_user = record.get("end_user")
        before = record.get("assessed") or "pass"
        if not detection.enabled:
            points.append(
                Point(clock[0], client, tier_name, end_user, record.get("risk"), 0.0, before,
                      "pass", "pass", "key")
            )  # fmt: skip
            continue
        features = _features(record, max(1, tier.logprobs.max_top))
        if end_user is not None and detection.end_users.enabled:
            scores = await score_with_end_user(store, client, end_user, features, detection)
            decided, whose = decide(scores.key, scores.own, scores.newcomers)
        else:
            profile, campaign = await store.observe(client, features)
            decided, whose = assess_key(detection, profile, campaign), "key"
        assert decided is not None
        deciding = decided
        mode = policies.mode_of(client, tier)
        before_risk = record.get("risk")
        if record.get("scope"):  # an end-user scope decided: its own or its newcomers'
            newcomers = NEWCOMER_MARK in record["scope"]
            before_risk = record.get("newcomers_risk" if newcomers else "end_user_risk")
        points.append(
            Point(
                ts=clock[0],
                client=client,
                tier=tier_name,
                end_user=end_user,
                risk_before=before_risk,
                risk_after=deciding.score,
                assessed_before=before,
                assessed_after=deciding.action,
                action_after=deciding.action if mode == "enforce" else "pass",
                scope=whose,
            )
        )
    return points


def report(points: list[Point]) -> dict[str, Any]:
    """Per client and per end user: actions before and after, and what changes."""
    scopes: dict[tuple[str, str | None], ScopeReport] = {}
    transitions: Counter[str] = Counter()
    for point in points:
        for key in {(point.client, None), (point.client, point.end_user)}:
            scope = scopes.get(key)
            if scope is None:
                scope = scopes[key] = ScopeReport(*key)
            scope.requests += 1
            scope.before[point.assessed_before] += 1
            scope.after[point.assessed_after] += 1
            scope.max_before = max(scope.max_before, point.risk_before or 0.0)
            scope.max_after = max(scope.max_after, point.risk_after)
            if point.assessed_before != point.assessed_after:
                scope.changed += 1
                if scope.first_change is None:
                    scope.first_change = scope.requests
        if point.assessed_before != point.assessed_after:
            transitions[f"{point.assessed_before} -> {point.assessed_after}"] += 1
    ordered = sorted(scopes.values(), key=lambda s: (-s.changed, s.client, s.end_user or ""))
    return {
        "requests": len(points),
        "changed": sum(transitions.values()),
        "transitions": dict(transitions.most_common()),
        "clients": [s.to_json() for s in ordered if s.end_user is None],
        "end_users": [s.to_json() for s in ordered if s.end_user is not None],
    }


def write_csv(points: list[Point], path: Path) -> None:
    """Every replayed request: time, client, end user, both risks and actions."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(_CSV_COLUMNS)
        for p in points:
            writer.writerow([
                p.ts, p.client, p.end_user or "", p.risk_before, p.risk_after,
                p.assessed_before, p.assessed_after, p.action_after, p.scope,
            ])  # fmt: skip


def plot_svg(points: list[Point], summary: dict[str, Any], policies: Policies, path: Path) -> int:
    """Risk against time for the clients whose action changes (else the riskiest), one
    panel each, before dashed and after solid, with the new policy's thresholds dotted.
    Returns the number of clients plotted."""
    clients = [c["client"] for c in summary["clients"] if c["changed"]][:_PLOTTED]
    if not clients:
        riskiest = sorted(summary["clients"], key=lambda c: -c["max_risk_after"])
        clients = [c["client"] for c in riskiest][:_PLOTTED]
    series: dict[str, list[Point]] = defaultdict(list)
    for point in points:
        if point.client in clients:
            series[point.client].append(point)
    width, panel, margin = 720, 170, 40
    height = panel * max(1, len(clients)) + margin
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{margin}" y="16">risk over time (hours): before dashed, after solid; '
        "thresholds of the replayed policy dotted</text>",
    ]
    plot_w, plot_h = width - 2 * margin - 60, panel - 40
    for row, client in enumerate(clients):
        pts = series[client]
        frame = _Frame(pts[0].ts, max(pts[-1].ts - pts[0].ts, 1.0), margin,
                       margin + row * panel + 10, plot_w, plot_h)  # fmt: skip
        parts.append(
            f'<rect x="{margin}" y="{frame.top}" width="{plot_w}" height="{plot_h}" '
            'fill="none" stroke="#999"/>'
        )
        parts.append(f'<text x="{margin}" y="{frame.top - 4}">{_escape(client)}</text>')
        for action, threshold in policies.tiers[pts[0].tier].detection.thresholds.by_action.items():
            if threshold > 1:
                continue
            left, right = frame.xy(frame.t0, threshold), frame.xy(frame.t0 + frame.span, threshold)
            parts.append(
                f'<polyline points="{left} {right}" stroke="#c33" stroke-dasharray="1,3" '
                'fill="none"/>'
            )
            parts.append(
                f'<text x="{margin + plot_w + 4}" y="{right.split(",")[1]}" fill="#c33">'
                f"{action} {threshold:g}</text>"
            )
        before = " ".join(frame.xy(p.ts, p.risk_before) for p in pts if p.risk_before is not None)
        after = " ".join(frame.xy(p.ts, p.risk_after) for p in pts)
        if before:
            parts.append(
                f'<polyline points="{before}" stroke="#888" stroke-dasharray="4,3" fill="none"/>'
            )
        parts.append(f'<polyline points="{after}" stroke="#15c" fill="none"/>')
        bottom = frame.top + plot_h + 14
        parts.append(
            f'<text x="{margin}" y="{bottom}">0</text>'
            f'<text x="{margin + plot_w - 40}" y="{bottom}">{frame.span / 3600:.2f} h</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return len(clients)


@dataclass(frozen=True, slots=True)
class _Frame:
    """One panel of the plot: time ``t0`` to ``t0 + span`` across, risk 0 to 1 up."""

    t0: float
    span: float
    left: float
    top: float
    width: float
    height: float

    def xy(self, ts: float, risk: float) -> str:
        """The SVG point of ``risk`` at ``ts``."""
        x = self.left + self.width * (ts - self.t0) / self.span
        y = self.top + self.height * (1 - min(max(risk, 0.0), 1.0))
        return f"{x:.1f},{y:.1f}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``replay`` subcommand."""
    replay = commands.add_parser(
        "replay", help="re-score a recorded audit log under another policy"
    )
    replay.add_argument("audit", type=Path, nargs="+", help="audit JSON-lines file(s)")
    replay.add_argument(
        "--policy",
        type=Path,
        action="append",
        required=True,
        help="a policy file (tiers and/or clients); repeat it for several, later ones win",
    )
    replay.add_argument("--out", type=Path, help="also write replay.json, risk.csv, risk.svg")
    replay.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``guard-server replay``."""
    try:
        policies = Policies.load(args.policy)
        lines, skipped = read_audit(args.audit)
        points = asyncio.run(_replay(lines, policies))
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = report(points)
    summary["skipped_without_features"] = skipped
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "replay.json").write_text(json.dumps(summary, indent=2))
        write_csv(points, args.out / "risk.csv")
        summary["plotted_clients"] = plot_svg(points, summary, policies, args.out / "risk.svg")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    _print(summary, args.out)
    return 0


def _print(summary: dict[str, Any], out: Path | None) -> None:
    print(f"{summary['requests']} requests replayed ({summary['skipped_without_features']} "
          f"request lines without features skipped); the action the score calls for changes "
          f"for {summary['changed']}")  # fmt: skip
    for transition, count in summary["transitions"].items():
        print(f"  {transition}: {count}")
    rows = [s for s in summary["clients"] + summary["end_users"] if s["changed"]]
    if rows:
        print("| client | end user | requests | before | after | changed | first change | "
              "max risk before -> after |")  # fmt: skip
        print("|---|---|---:|---|---|---:|---:|---|")
        for s in rows:
            print(f"| {s['client']} | {s['end_user'] or ''} | {s['requests']} | "
                  f"{_counts(s['before'])} | {_counts(s['after'])} | {s['changed']} | "
                  f"{s['first_change']} | {s['max_risk_before']:.3f} -> "
                  f"{s['max_risk_after']:.3f} |")  # fmt: skip
    if out is not None:
        print(f"wrote {out / 'replay.json'}, {out / 'risk.csv'}, {out / 'risk.svg'}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{action} {n}" for action, n in counts.items())
