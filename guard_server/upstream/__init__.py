"""Upstream model servers: pooled clients, health, load spreading, the managed vLLM process."""
