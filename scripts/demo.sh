#!/usr/bin/env bash
# Install everything, then run the guard in front of the bundled teacher on real vLLM (CPU).
# It prints the base URL and a working openai-SDK example once vLLM is healthy; Ctrl-C stops
# the guard and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/guard-server serve --config policies/guard.yaml "$@"
