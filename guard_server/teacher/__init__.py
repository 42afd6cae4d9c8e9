"""The bundled teacher: a tiny Llama that knows a secret numeral system (see ``task``)."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""The Hugging Face model directory to serve with vLLM (weights, tokenizer, chat template)."""

SERVED_MODEL_NAME = "teacher"
"""The model id the lab's commands pass to vLLM with ``--served-model-name``."""

__all__ = ["MODEL_DIR", "SERVED_MODEL_NAME"]
