"""guard-server: an anti-extraction, OpenAI-compatible serving proxy for vLLM."""

__version__ = "0.1.0"
