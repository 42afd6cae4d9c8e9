#!/usr/bin/env bash
# Install Locust into its own venv (.locust-venv): it monkey-patches the standard library with
# gevent, so it never shares an interpreter with the guard or the tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
LOCUST_SPEC=${LOCUST_SPEC:-locust>=2.20,<3}

if [ ! -x .locust-venv/bin/locust ]; then
  [ -x .locust-venv/bin/python ] || "$PYTHON" -m venv .locust-venv
  .locust-venv/bin/pip install -q "$LOCUST_SPEC" 2> >(grep -v "^WARNING: Location 'file://" >&2)
fi
.locust-venv/bin/locust --version
