"""The soak's short version (the 30-minute one: ``python -m load_tests.soak``, RELIABILITY.md):
20 s at half saturation, 1,000 clients cycling (a pass every 6 s or so), in each state mode.
Its figures: the slopes of RSS, open fds, asyncio tasks (and Redis memory), the statuses,
the probe's admissions."""

from __future__ import annotations

from pathlib import Path

import pytest

from load_tests.soak import soak


@pytest.mark.parametrize("mode", ["memory", "redis"])
def test_a_short_soak_is_flat_and_exact(tmp_path: Path, mode: str) -> None:
    report = soak(mode, minutes=1 / 3, clients=1000, sample_s=2, work=tmp_path)
    slopes = {k: f"{v['slope_per_min']:+,.0f}/min" for k, v in report.flatness.items()}
    print(
        f"\nsoak {mode}: {report.requests} requests at {report.rate:.0f} req/s "
        f"(saturation {report.saturation_rps:.0f}), statuses {report.statuses}, skipped "
        f"{report.skipped}, probe {report.probe_admitted} <= {report.probe_allowed:.0f}, "
        f"slopes {slopes}"
    )
    assert not report.failures, report.failures
    assert report.requests >= 0.9 * report.rate * report.seconds  # the rate was held
    assert len(report.samples) >= 8
