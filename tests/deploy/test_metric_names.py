"""Every metric and label the dashboard and the alerts use is one a running guard exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from guard_server import top_clients
from guard_server.metrics import GuardMetrics
from guard_server.testing import GuardProcess, free_port, write_test_config
from tests.deploy.toolchain import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "guard-server.json"
RULES = DEPLOY / "prometheus" / "guard-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "tests.yaml"
# Labels Prometheus adds to every scraped series (ServiceMonitor targets), and `le`.
TARGET_LABELS = {"pod", "namespace", "instance", "job", "service", "container"}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, variables, annotations."""
    queries = []
    for node in _walk(json.loads(DASHBOARD.read_text())):
        if isinstance(node.get("expr"), str):
            queries.append(node["expr"])
        if isinstance(node.get("definition"), str):
            queries.append(node["definition"])
    return queries


def rule_queries() -> list[str]:
    """Every expression of the alerting rules."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _metric_names(query: str) -> set[str]:
    return set(re.findall(r"\bguard_[a-z0-9_]+\b", query))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The series names a running guard exports (from the `# TYPE` lines of /metrics).

    A labelled metric shows samples only once a label set was used, but its HELP and TYPE
    lines are always there. The upstream is a closed port: /metrics works without vLLM.
    """
    directory = tmp_path_factory.mktemp("guard-metrics")
    config = write_test_config(directory, [f"http://127.0.0.1:{free_port()}"])
    guard = GuardProcess(config, directory / "guard.log").start()
    try:
        text = guard.metrics()
    finally:
        guard.stop()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)  # counters are typed with their _total name
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def label_names() -> dict[str, set[str]]:
    """The label names of each exported series, from the guard's metric definitions (and
    the scrape-time top-clients gauge)."""
    labels: dict[str, set[str]] = {top_clients.NAME: set(top_clients.LABELS)}
    for metric in vars(GuardMetrics()).values():
        kind = getattr(metric, "_type", None)
        if kind is None:
            continue
        names = set(metric._labelnames)
        if kind == "counter":
            labels[metric._name + "_total"] = names
        elif kind == "histogram":
            labels[metric._name + "_bucket"] = names | {"le"}
            labels[metric._name + "_sum"] = labels[metric._name + "_count"] = names
        else:
            labels[metric._name] = names
    return labels


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_used_is_exported_by_a_running_guard(exported: set[str], source: str) -> None:
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    used = set().union(*map(_metric_names, queries))
    assert used, f"no guard metric found in the {source}"
    assert used <= exported, f"not exported by the guard: {sorted(used - exported)}"


def test_rule_unit_tests_feed_exported_series(exported: set[str]) -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    series = {s["series"].split("{")[0] for case in cases for s in case["input_series"]}
    assert series <= exported, f"not exported by the guard: {sorted(series - exported)}"


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_label_used_exists_on_its_metrics(source: str) -> None:
    labels = label_names()
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    for query in queries:
        metrics = _metric_names(query)
        known = set().union(*(labels[m] for m in metrics)) | TARGET_LABELS
        # label matchers: metric{label="..."} and the labels of `by (...)` / `without (...)`
        for name, matchers in re.findall(r"\b(guard_[a-z0-9_]+)\{([^}]*)\}", query):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels[name] | TARGET_LABELS, (query, label)
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in known, (query, label)


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
    titles = " ".join(panel["title"] for panel in panels).lower()
    for topic in ("tier", "actions", "risk", "flagged", "overhead", "first token", "429", "decoy"):
        assert topic in titles, topic


def test_dashboard_is_deployed_for_grafana(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config_maps = [o for o in rendered["overlays/prod"] if o["kind"] == "ConfigMap"]
    (dashboard,) = [c for c in config_maps if "guard-server.json" in c.get("data", {})]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["guard-server.json"]) == json.loads(DASHBOARD.read_text())
