"""The bundled teacher: the small model shipped in this package, served by real vLLM."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from guard_server.config.schema import BundledTeacherSettings, UpstreamSettings
from guard_server.upstream.vllm_process import VllmProcess

log = logging.getLogger(__name__)

TEACHER_DIR = Path(__file__).resolve().parents[1] / "teacher" / "model"
PLUGIN = "guard_server.vllm_plugin:GuardLogitsProcessor"


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


def start_bundled_teacher(settings: BundledTeacherSettings) -> VllmProcess:
    """Start vLLM on the teacher (with the guard's plugin) and wait until it is healthy."""
    process = VllmProcess(
        TEACHER_DIR,
        settings.model_name,
        port=settings.port,
        max_logprobs=settings.max_logprobs,
        extra_args=plugin_args() if settings.plugin else [],
    )
    process.start()
    try:
        seconds = process.wait_healthy(settings.startup_timeout_s)
    except BaseException:
        process.stop()
        raise
    log.info("bundled teacher healthy on %s after %.1f s", process.url, seconds)
    return process


def teacher_upstream(settings: BundledTeacherSettings, process: VllmProcess) -> UpstreamSettings:
    """The upstream entry that points at a running bundled teacher."""
    return UpstreamSettings(urls=[process.url], guard_plugin=settings.plugin)
