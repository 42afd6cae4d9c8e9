"""Managed models: the bundled teacher (or SmolLM2), served by real vLLM as our child process."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from guard_server.config.schema import BundledTeacherSettings, UpstreamSettings
from guard_server.teacher import MODEL_DIR
from guard_server.upstream import smollm2
from guard_server.upstream.vllm_process import VllmProcess

log = logging.getLogger(__name__)

TEACHER_DIR = MODEL_DIR
PLUGIN = "guard_server.vllm_plugin:GuardLogitsProcessor"


@dataclass(frozen=True, slots=True)
class ManagedModel:
    """A model ``serve`` can run itself, and the vLLM settings it needs on a CPU."""

    locate: Callable[[], Path]  # the model directory; raises ModelUnavailable if absent
    max_model_len: int
    dtype: str
    kv_cache_gib: int
    sample_question: str  # for the startup banner


def _smollm2_dir() -> Path:
    if not smollm2.is_converted():
        raise smollm2.ModelUnavailable(
            f"SmolLM2 is not converted in {smollm2.model_dir()}: {smollm2.INSTALL_HINT}"
        )
    return smollm2.model_dir()


MODELS: dict[str, ManagedModel] = {
    "arithmetic": ManagedModel(lambda: TEACHER_DIR, 256, "float32", 1, ""),
    # float32, not bfloat16: bfloat16 answers were measurably worse (docs/evaluation.md,
    # "On a real model"); 2,048 tokens of context is plenty for chat and the lab.
    "smollm2": ManagedModel(_smollm2_dir, 2048, "float32", 2, "What is the capital of France?"),
}


def plugin_args() -> list[str]:
    """The vLLM arguments that load the guard's plugin.

    None when this environment registers it as a ``vllm.logits_processors`` entry point
    (``pip install guard-server``): vLLM then loads it by itself, and loading it twice is
    refused.
    """
    for entry_point in metadata.entry_points(group="vllm.logits_processors"):
        if entry_point.value == PLUGIN:
            return []
    return ["--logits-processors", PLUGIN]


def managed_vllm(
    model: str,
    served_name: str,
    *,
    port: int = 0,
    max_logprobs: int = 20,
    plugin: bool = True,
    log_path: Path | None = None,
    dtype: str | None = None,
    api_key: str | None = None,
    otlp_traces_endpoint: str | None = None,
) -> VllmProcess:
    """A (not yet started) vLLM for the managed ``model`` (a key of :data:`MODELS`);
    ``dtype`` overrides the model's (for comparisons).

    With ``api_key`` vLLM requires it on ``/v1`` (given in its environment,
    ``VLLM_API_KEY``, not on its command line, which any local user can read). With
    ``otlp_traces_endpoint`` it exports its request spans there (OTLP/HTTP, like the guard).
    """
    spec = MODELS[model]
    env = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    extra_args = plugin_args() if plugin else []
    if otlp_traces_endpoint:
        extra_args += ["--otlp-traces-endpoint", otlp_traces_endpoint]
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    return VllmProcess(
        spec.locate(),
        served_name,
        port=port,
        max_logprobs=max_logprobs,
        max_model_len=spec.max_model_len,
        dtype=dtype or spec.dtype,
        extra_args=extra_args,
        log_path=log_path,
        env=env,
        log_stats=otlp_traces_endpoint is not None,  # vLLM traces requests only with stats
    )


def start_bundled_teacher(
    settings: BundledTeacherSettings, api_key: str, otlp_traces_endpoint: str | None = None
) -> VllmProcess:
    """Start vLLM on the configured model (with the guard's plugin) and wait until healthy.

    vLLM requires ``api_key``, which only the guard holds, so that no other local process
    can skip the guard; with ``otlp_traces_endpoint`` its spans join the guard's traces.
    """
    process = managed_vllm(
        settings.model,
        settings.public_name,
        port=settings.port,
        max_logprobs=settings.max_logprobs,
        plugin=settings.plugin,
        api_key=api_key,
        otlp_traces_endpoint=otlp_traces_endpoint,
    )
    process.start()
    try:
        seconds = process.wait_healthy(settings.startup_timeout_s)
    except BaseException:
        process.stop()
        raise
    log.info("%s healthy on %s after %.1f s", settings.model, process.url, seconds)
    return process


def teacher_upstream(settings: BundledTeacherSettings, process: VllmProcess) -> UpstreamSettings:
    """The upstream entry that points at a running managed model."""
    return UpstreamSettings(urls=[process.url], guard_plugin=settings.plugin)
