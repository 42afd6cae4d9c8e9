"""Shared state (rate limits, later risk scores): in process, or in Redis across replicas."""
