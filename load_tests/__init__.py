"""Load tests, attacks and lab experiments for guard-server."""
