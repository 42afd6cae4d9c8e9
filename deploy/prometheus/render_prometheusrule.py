"""Write prometheusrule.yaml: the PrometheusRule that embeds the groups of guard-rules.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = """\
# GENERATED from guard-rules.yaml by render_prometheusrule.py: edit that file, then run
#   python deploy/prometheus/render_prometheusrule.py
# tests/deploy fails when the two differ.
"""


def prometheus_rule(rules: dict) -> dict:
    """The PrometheusRule object (monitoring.coreos.com/v1) holding ``rules['groups']``."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "guard-server",
            "labels": {"app.kubernetes.io/name": "guard-server"},
        },
        "spec": {"groups": rules["groups"]},
    }


def main() -> None:
    rules = yaml.safe_load((HERE / "guard-rules.yaml").read_text())
    body = yaml.safe_dump(prometheus_rule(rules), sort_keys=False, width=100)
    (HERE / "prometheusrule.yaml").write_text(HEADER + body)


if __name__ == "__main__":
    main()
