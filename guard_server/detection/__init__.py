"""Extraction detection: request features, bounded per-client profiles, explainable scores."""
