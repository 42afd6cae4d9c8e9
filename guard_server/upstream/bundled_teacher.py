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
) -> VllmProcess:
    """A (not yet started) vLLM for the managed ``model`` (a key of :data:`MODELS`);
    ``dtype`` overrides the model's (for comparisons)."""
    spec = MODELS[model]
    env = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)
    return VllmProcess(
        spec.locate(),
        served_name,
        port=port,
        max_logprobs=max_logprobs,
        max_model_len=spec.max_model_len,
        dtype=dtype or spec.dtype,
        extra_args=plugin_args() if plugin else [],
        log_path=log_path,
        env=env,
    )


def start_bundled_teacher(settings: BundledTeacherSettings) -> VllmProcess:
    """Start vLLM on the configured model (with the guard's plugin) and wait until healthy."""
    process = managed_vllm(
        settings.model,
        settings.public_name,
        port=settings.port,
        max_logprobs=settings.max_logprobs,
        plugin=settings.plugin,
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
