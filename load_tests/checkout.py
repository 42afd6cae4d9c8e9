"""A guard run from another checkout of this repository, for before/after figures.

    git worktree add /tmp/before cfb0f7e
    .venv/bin/python -m load_tests.attacks.nonce_averaging --guard-checkout /tmp/before ...

The simulators, the traffic and the measurements stay this checkout's; only the guard runs the
other checkout's code (its working directory and ``PYTHONPATH``) with that checkout's shipped
tiers (``policies/default.yaml``). Config keys the other checkout's schema does not know yet
(``metrics.port``, say) are dropped from the generated config, as its ``check-config`` reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from guard_server.testing import GuardProcess

_UNKNOWN = re.compile(r"^\s+([\w.]+): unknown field", re.MULTILINE)
_REFUSED_NULL = re.compile(r"^\s+([\w.]+): .*\(got None\)$", re.MULTILINE)
_REFUSED_FILE = re.compile(r"^error: (\S+?): \d+ invalid field", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Checkout:
    """Another checkout (a ``git worktree`` of an earlier commit) whose guard to run."""

    root: Path

    @property
    def policy(self) -> Path:
        """The checkout's shipped tiers."""
        return self.root / "policies" / "default.yaml"

    @property
    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.root)}

    def check(self, config: Path) -> subprocess.CompletedProcess[str]:
        """The checkout's ``check-config`` on ``config``."""
        argv = [sys.executable, "-m", "guard_server", "check-config", str(config)]
        return subprocess.run(
            argv, cwd=self.root, env=self._environ(), capture_output=True, text=True, check=False
        )

    def adapt(self, config: Path) -> None:
        """Drop the keys the checkout's schema calls unknown, and the nulls it refuses (its
        default then applies), from ``config`` or the policy file its ``check-config`` names;
        raise if it still refuses the config."""
        for _ in range(8):  # one file per pass: the config, then each policy file
            result = self.check(config)
            output = result.stdout + result.stderr
            header = _REFUSED_FILE.search(output)
            dropped = _UNKNOWN.findall(output) + _REFUSED_NULL.findall(output)
            if result.returncode == 0 or header is None or not dropped:
                break
            path = Path(header.group(1))
            data = yaml.safe_load(path.read_text())
            for dotted in dropped:
                _drop(data, dotted.split("."))
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        if result.returncode != 0:
            raise SystemExit(f"{self.root}: config refused:\n{result.stdout}{result.stderr}")

    def guard(self, config: Path, log_path: Path, *, port: int) -> GuardProcess:
        """A guard of this checkout serving ``config`` (adapted first)."""
        self.adapt(config)
        return GuardProcess(config, log_path, port=port, env=self.env, cwd=self.root)

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def guard_process(
    checkout: Checkout | None, config: Path, log_path: Path, *, port: int
) -> GuardProcess:
    """This checkout's guard, or ``checkout``'s."""
    if checkout is None:
        return GuardProcess(config, log_path, port=port)
    return checkout.guard(config, log_path, port=port)


def _drop(data: dict, path: list[str]) -> None:
    """Remove ``data[path]``, and the sections it leaves empty."""
    *parents, leaf = path
    sections = [data]
    for name in parents:
        sections.append(sections[-1][name])
    sections[-1].pop(leaf, None)
    for depth in range(len(parents), 0, -1):
        if sections[depth]:
            break
        sections[depth - 1].pop(parents[depth - 1])
