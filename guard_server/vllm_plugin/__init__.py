"""The guard's vLLM plugin: a logits processor for keyed noise, watermarking and sampling bounds.

Load it with ``--logits-processors guard_server.vllm_plugin:GuardLogitsProcessor`` or through
the ``vllm.logits_processors`` entry point. It imports torch and vLLM, never the server.
"""

from guard_server.vllm_plugin.processor import GuardLogitsProcessor

__all__ = ["GuardLogitsProcessor"]
