#!/usr/bin/env bash
# Run the whole test suite. Installs what is missing first; the pytest session itself starts
# real vLLM (CPU) on the bundled teacher and stops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
