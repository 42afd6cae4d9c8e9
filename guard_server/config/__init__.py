"""Configuration: the pydantic schema, loading with clear errors, and live reload."""
