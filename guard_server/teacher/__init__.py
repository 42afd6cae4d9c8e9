"""The bundled teacher: a tiny Llama that knows a secret numeral system (see ``task``)."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""The Hugging Face model directory to serve with vLLM (weights, tokenizer, chat template)."""

SERVED_MODEL_NAME = "teacher"
"""The model id the lab's commands pass to vLLM with ``--served-model-name``."""

EMBEDDING_MODEL_NAME = "teacher-embed"
"""The model id of the bundled teacher served as an embedding model (``EMBEDDING_VLLM_ARGS``)."""

EMBEDDING_VLLM_ARGS = ("--convert", "embed")
"""vLLM 0.32's flags that serve the (causal LM) teacher as a pooling model on ``/v1/embeddings``:
last-token pooling, vectors normalized to unit length."""

__all__ = ["EMBEDDING_MODEL_NAME", "EMBEDDING_VLLM_ARGS", "MODEL_DIR", "SERVED_MODEL_NAME"]
