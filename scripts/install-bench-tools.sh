#!/usr/bin/env bash
# Install the benchmark's extra tools (idempotent): py-spy into .venv, and the LiteLLM proxy
# (the peer the guard is compared with) into its own venv .bench-venv/, so its many
# dependencies never touch the guard's. wrk, hey and redis-server come from apt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
LITELLM_SPEC=${LITELLM_SPEC:-litellm[proxy]}

missing=()
for tool in wrk hey redis-server; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q && apt-get install -y -q wrk hey redis-server
  else
    echo "missing: ${missing[*]} (apt-get install wrk hey redis-server)" >&2
    exit 1
  fi
fi

quiet_pip() {
  # pip warns once per package about this machine's extra local index; keep real errors.
  "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}

[ -x .venv/bin/python ] || ./scripts/install.sh
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('py_spy') is None)" 2>/dev/null \
  || [ -x .venv/bin/py-spy ] || quiet_pip .venv/bin/pip install -q py-spy

if [ ! -x .bench-venv/bin/litellm ]; then
  [ -x .bench-venv/bin/python ] || "$PYTHON" -m venv .bench-venv
  quiet_pip .bench-venv/bin/pip install -q --upgrade pip
  quiet_pip .bench-venv/bin/pip install -q "$LITELLM_SPEC" prometheus-client
fi
LITELLM_LOCAL_MODEL_COST_MAP=True .bench-venv/bin/python -c "import litellm, importlib.metadata as m; print('litellm', m.version('litellm'))"
.venv/bin/py-spy --version
