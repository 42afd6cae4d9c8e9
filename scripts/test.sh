#!/usr/bin/env bash
# Run the whole test suite. Installs what is missing first (the venv, redis-server, the
# deploy checkers, Locust in its own venv); the pytest session itself starts real vLLM (CPU)
# on the bundled teacher (and on SmolLM2) and redis-server on loopback, and stops them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
./scripts/install-smollm2.sh
./scripts/install-deploy-tools.sh
./scripts/install-locust.sh
exec .venv/bin/python -m pytest -q "$@"
